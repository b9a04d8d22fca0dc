"""A tiny random GPT-2 with a real (byte-level BPE) tokenizer, saved as a Hugging Face folder.

Tests boot it through the same `sae.lm.load_model` path a user's local model takes (the fixtures
`tiny_lm_dir` and `tiny_lm` are in the repository's conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae.cli.run_config import RunConfig
from sae.typed_config import from_dict

TINY_VOCAB = 320


def make_tiny_lm(
    directory: Path, n_layer: int = 2, d_model: int = 32, n_head: int = 4, seed: int = 0
) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from sae.data import stdlib_source_files

    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    sample = [p.read_text(errors="replace") for p in stdlib_source_files()[:20]]
    bpe.train_from_iterator(sample, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=d_model,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def make_tiny_gemma(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random Gemma 3 (RMSNorm with q/k norms, GeGLU MLP, grouped-query attention) on the tiny
    GPT-2's tokenizer: the architecture of the default model at test size."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    Gemma3ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_run_config(model_dir: Path, tmp: Path, **sections) -> RunConfig:
    """A run config on the tiny model with small, fast settings; `sections` update a section's keys."""

    data = {
        "model": {"name": str(model_dir), "dtype": "float32"},  # as the tiny_lm fixture loads it
        "data": {"context_size": 32},
        "cache": {
            "dir": str(tmp / "cache"),
            "hookpoints": ["blocks.1.hook_resid_post"],
            "tokens": 3000,
            "batch_contexts": 8,
            "shard_contexts": 16,
        },
        "sae": {"architecture": "topk", "d_sae": 64, "k": 4},
        "train": {"batch_size": 256, "out_dir": str(tmp / "out"), "log_every": 5},
        "eval": {"tokens": 600, "batch_contexts": 4},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return from_dict(RunConfig, data, "config")
