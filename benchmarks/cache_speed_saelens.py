"""SAELens's CacheActivationsRunner on the same model, hookpoint and contexts as benchmarks/cache_speed.py.

SAELens needs transformer-lens 3.x, so this runs from a separate virtualenv with sae-lens installed:

    HF_HUB_OFFLINE=1 /path/to/saelens-venv/bin/python benchmarks/cache_speed_saelens.py [--tokens N]

It reads the Gemma 3 270M folder our toolkit converted (run `python train.py` or our benchmark first),
tokenizes the offline corpus the way our cache does, and measures, in the same process: the bare
HookedTransformer `run_with_cache(..., stop_at_layer=7)` forward, and `CacheActivationsRunner.run()`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def gemma_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    folder = Path(base) / "sae-toolkit" / "models" / "gemma-3-270m-q4_k_m-fp32"
    if not (folder / "sae_toolkit_source.json").is_file():
        sys.exit(
            f"{folder} not found: run `python train.py` (or benchmarks/cache_speed.py) once to convert Gemma"
        )
    return folder


def stdlib_contexts(tokenizer, context_size: int, n: int) -> list[list[int]]:
    sys.path.insert(0, str(REPO))
    from sae.data import (
        iter_documents,
        pack_contexts,
    )  # plain Python + tokenizers: no transformer-lens 4 needed

    return list(islice(pack_contexts(iter_documents("python-stdlib"), tokenizer, context_size), n))


def main() -> None:
    from datasets import Dataset
    from sae_lens.cache_activations_runner import CacheActivationsRunner
    from sae_lens.config import CacheActivationsRunnerConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--batch-contexts", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/cache_speed_saelens.json"))
    args = parser.parse_args()

    folder, context_size, hook = gemma_folder(), 128, "blocks.6.hook_resid_post"
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    n_contexts = -(-args.tokens // context_size) // args.batch_contexts * args.batch_contexts
    contexts = stdlib_contexts(tokenizer, context_size, n_contexts)
    tokens = n_contexts * context_size
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)

    with tempfile.TemporaryDirectory(prefix="saelens_cache_") as out_dir:
        config = CacheActivationsRunnerConfig(
            dataset_path="",
            model_name="google/gemma-3-270m",
            model_batch_size=args.batch_contexts,
            hook_name=hook,
            d_in=640,
            training_tokens=tokens,
            context_size=context_size,
            dtype="float32",  # its Arrow-based storage has no bfloat16
            device="cpu",
            new_cached_activations_path=str(Path(out_dir) / "acts"),
            shuffle=False,
            # One buffer of exactly these tokens: the 2 GB default would compute ~1.5M tokens whatever is
            # asked.
            buffer_size_gb=tokens * 640 * 4 / 1e9,
            prepend_bos=False,  # our contexts already start with BOS
            model_from_pretrained_kwargs={"hf_model": hf_model, "tokenizer": tokenizer, "dtype": dtype},
        )
        runner = CacheActivationsRunner(config, override_dataset=Dataset.from_dict({"input_ids": contexts}))
        model = runner.model
        batches = [
            torch.tensor(contexts[i : i + args.batch_contexts])
            for i in range(0, n_contexts, args.batch_contexts)
        ]
        with torch.no_grad():
            model.run_with_cache(batches[0], names_filter=[hook], stop_at_layer=7)  # warm-up
            started = time.perf_counter()
            for batch in batches:
                model.run_with_cache(batch, names_filter=[hook], stop_at_layer=7)
            bare = time.perf_counter() - started
        started = time.perf_counter()
        runner.run()
        cached = time.perf_counter() - started

    result = {
        "library": "sae-lens CacheActivationsRunner",
        "model": "gemma-3-270m (our GGUF->HF folder)",
        "model_dtype": args.dtype,
        "cache_dtype": "float32",
        "hookpoint": hook,
        "tokens": tokens,
        "batch_contexts": args.batch_contexts,
        "bare_tokens_per_s": tokens / bare,
        "cache_tokens_per_s": tokens / cached,
        "ratio": bare / cached,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(
        f"SAELens: bare HookedTransformer {tokens / bare:,.0f} tok/s, "
        f"CacheActivationsRunner {tokens / cached:,.0f} tok/s ({bare / cached:.1%} of bare)  -> {args.out}"
    )


if __name__ == "__main__":
    main()
