"""A model with a circuit known by training: a 2-layer attention-only transformer trained on repeated
random token sequences, which grows previous-token -> induction heads (Olsson et al. 2022).

It is a GPT-NeoX whose MLPs are zeroed and frozen (so the blocks are attention-only), with a word-level
tokenizer "<bos> t0 t1 ...", saved as a Hugging Face folder so that it loads through
`sae.lm.load_model` like any local model. About 40 s on one CPU thread.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae.analysis.circuits.tasks import Task, induction

N_TOKENS = 128  # with 48 tokens, 4,000 steps gave no previous-token head; with 128 it forms by step ~400
HALF = 10


RETRIEVE = "<ret>"  # distractor rule: after this token, predict the first token of the sequence


def _tokenizer(n_tokens: int, with_retrieve: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, **{f"t{i}": i + 1 for i in range(n_tokens)}, "<unk>": n_tokens + 1}
    if (
        with_retrieve
    ):  # only then: the vocabulary size (and so the initialisation) of the plain toy stays as it was
        vocab[RETRIEVE] = n_tokens + 2
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<bos>", unk_token="<unk>")


def _attention_only_model(n_layers: int, n_heads: int, d_model: int, vocab_size: int, seed: int):
    """A GPT-NeoX (rotary positions: relative offsets such as "previous token" are easy to learn; with
    GPT-2's learned absolute positions no previous-token head formed in 2,000 steps) whose MLPs are
    zeroed and frozen, so every block is attention-only."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=4 * d_model,
        rotary_pct=1.0,
        max_position_embeddings=64,
        use_parallel_residual=False,
        bos_token_id=0,
        eos_token_id=0,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    for layer in model.gpt_neox.layers:
        for p in layer.mlp.parameters():  # zero weights and biases: every MLP outputs exactly 0
            p.data.zero_()
            p.requires_grad_(False)
    return model


def repeated_sequences(
    n: int,
    n_tokens: int,
    generator: torch.Generator,
    length: int = 1 + 2 * HALF + 4,
    half_range: tuple[int, int] = (3, HALF + 2),
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens [n, length]: BOS, a segment of distinct random tokens, the same segment again, random
    filler; and induction_targets [n, length - 1] bool: next-token targets only induction can predict.

    The segment's length varies (half_range, inclusive), so the distance between a token and its
    repetition varies: a head cannot predict the repeat from positions alone (with a fixed length the
    model learns exactly that shortcut instead of induction).
    """
    rows = torch.randint(1, n_tokens + 1, (n, length), generator=generator)
    rows[:, 0] = 0
    targets = torch.zeros(n, length - 1, dtype=torch.bool)
    for row, target in zip(rows, targets, strict=True):
        half = int(torch.randint(half_range[0], half_range[1] + 1, (), generator=generator))
        segment = torch.randperm(n_tokens, generator=generator)[:half] + 1
        row[1 : 1 + 2 * half] = torch.cat([segment, segment])
        target[1 + half : 2 * half] = True  # predicting tokens 2..half of the second copy
    return rows, targets


def retrieval_sequences(
    n: int,
    n_tokens: int,
    retrieve_id: int,
    generator: torch.Generator,
    length: int = 1 + 2 * HALF + 4,
    n_queries: int = 3,
) -> torch.Tensor:
    """The distractor rule: random tokens with `n_queries` <ret> tokens at random positions (>= 3); the
    token after each <ret> is the sequence's first token. -> tokens [n, length]. A model trained on both
    grows heads that attend to the first token: active on induction prompts too (whose first token is
    what the corruption changes) but not needed there, which is what makes them distractors."""
    rows = torch.randint(1, n_tokens + 1, (n, length), generator=generator)
    rows[:, 0] = 0
    for row in rows:
        for position in torch.randperm(length - 4, generator=generator)[:n_queries] + 2:
            row[position] = retrieve_id
            row[position + 1] = row[1]
    return rows


def train_induction_model(
    directory: Path,
    steps: int = 1000,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    trained: bool = True,
    retrieval_fraction: float = 0.0,
) -> dict:
    """Train (or, with trained=False, only initialise: the re-initialised control) and save to `directory`.

    retrieval_fraction > 0 mixes in that fraction of `retrieval_sequences` (the distractor rule).
    Returns the loss on the induction targets at the end: about log(n_tokens) without induction, near 0
    with it.
    """
    directory = Path(directory)
    tokenizer = _tokenizer(N_TOKENS, with_retrieve=retrieval_fraction > 0)
    model = _attention_only_model(n_layers, n_heads, d_model, len(tokenizer), seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01
    )
    curve = []  # loss on the induction targets, every 50 steps
    for step in range(steps if trained else 0):
        tokens, induction_targets = repeated_sequences(batch_size, N_TOKENS, generator)
        n_retrieval = round(retrieval_fraction * batch_size)
        if n_retrieval:  # replace the first rows by distractor-rule rows (no induction targets in them)
            tokens[:n_retrieval] = retrieval_sequences(
                n_retrieval, N_TOKENS, N_TOKENS + 2, generator, tokens.shape[1]
            )
            induction_targets[:n_retrieval] = False
        logits = model(tokens).logits[:, :-1]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        loss = losses.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            curve.append(round(float(losses[induction_targets].detach().mean()), 4))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {
        "induction_loss": curve[-1] if curve else None,
        "loss_curve": curve,
        "steps": steps if trained else 0,
        "seed": seed,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "d_model": d_model,
        "retrieval_fraction": retrieval_fraction,
    }


def induction_task(n: int, seed: int = 0, query: int = 6) -> Task:
    """The induction task in this model's vocabulary (token ids 1..N_TOKENS, BOS = 0)."""
    return induction(list(range(1, N_TOKENS + 1)), n, half=HALF, query=query, bos=0, seed=seed)


# The toy models: "2l4h" is 2 layers x 4 heads trained on induction only (its circuit is all of layer 1 plus
# 1-2 heads of layer 0); "2l8h_distractors" has 8 heads per layer and half its training rows follow a
# second rule (after <ret>, copy the first token), which grows heads that are active on the induction
# prompts but not needed by them.
TOYS = {
    "2l4h": {"n_layers": 2, "n_heads": 4, "retrieval_fraction": 0.0},
    "2l8h_distractors": {"n_layers": 2, "n_heads": 8, "retrieval_fraction": 0.5},
}
