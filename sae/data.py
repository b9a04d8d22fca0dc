"""Text in, packed token contexts out.

Sources: the offline corpus (`python-stdlib`: the Python standard library's own source files, present
on every machine), a Hugging Face hub dataset by name (streamed), or local .txt/.json/.jsonl/.parquet
files. Documents are tokenized without special tokens, joined with an EOS separator, and cut into
contexts of `context_size` tokens that each start with one BOS: [BOS, t_1, ..., t_{context_size-1}].
Everything here is deterministic, so a resumed cache reads exactly the contexts it would have read.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from sae.typed_config import ConfigError

OFFLINE_CORPUS = "python-stdlib"
_LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SKIPPED_STDLIB_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class DataConfig:
    """The [data] section of a run config: which text, cut into contexts of which size."""

    dataset: str = OFFLINE_CORPUS
    """`python-stdlib` (offline corpus), a hub dataset name, or local .txt/.json/.jsonl/.parquet files."""
    split: str = "train"
    text_column: str = "text"
    context_size: int = 128
    """Tokens per packed context, BOS included."""
    seed: int = 0
    """Order of the offline corpus's files (hub datasets are read in their own order)."""

    def __post_init__(self) -> None:
        if self.context_size < 2:
            raise ConfigError(
                f"data.context_size must be at least 2 (BOS + one token), got {self.context_size}"
            )


def stdlib_source_files(seed: int = 0) -> list[Path]:
    """The standard library's .py files (tests and site-packages excluded), in a seeded random order.

    Shuffling mixes modules, so a prefix of the corpus is not all `asyncio` or all `email`.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not _SKIPPED_STDLIB_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    if not files:
        raise FileNotFoundError(f"no Python source files under the standard library path {root}")
    random.Random(seed).shuffle(files)
    return files


def iter_documents(
    dataset: str, split: str = "train", text_column: str = "text", seed: int = 0
) -> Iterator[str]:
    """Documents as strings, from the offline corpus, a local file or directory, or a hub dataset."""
    if dataset == OFFLINE_CORPUS:
        for path in stdlib_source_files(seed):
            yield path.read_text(encoding="utf-8", errors="replace")
        return
    rows = _load_hf_dataset(dataset, split)
    for i, row in enumerate(rows):
        if text_column not in row:
            raise KeyError(
                f"dataset {dataset!r} row {i} has no column {text_column!r}; columns: {sorted(row)}"
            )
        yield row[text_column]


def _load_hf_dataset(dataset: str, split: str) -> Iterable[dict]:
    import datasets

    path = Path(dataset)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_BUILDERS) if path.is_dir() else [path]
        suffixes = {p.suffix for p in files}
        if not files or len(suffixes) != 1 or not suffixes <= set(_LOCAL_BUILDERS):
            raise ValueError(
                f"{dataset}: expected files of one kind among {', '.join(_LOCAL_BUILDERS)}, "
                f"found {sorted(suffixes) or 'none'}"
            )
        builder = _LOCAL_BUILDERS[suffixes.pop()]
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split=split, streaming=True)
    return datasets.load_dataset(dataset, split=split, streaming=True)


def pack_contexts(
    documents: Iterable[str], tokenizer, context_size: int, docs_per_batch: int = 64
) -> Iterator[list[int]]:
    """Token contexts [context_size], each one BOS followed by the running token stream.

    Documents are joined with EOS (or BOS when the tokenizer has no EOS) so the model sees where one
    ends; a document longer than a context simply continues into the next context.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no BOS token; packing needs one")
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = context_size - 1
    stream: list[int] = []
    documents = iter(documents)
    while batch := list(islice(documents, docs_per_batch)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(separator)
        while len(stream) >= body:
            yield [bos, *stream[:body]]
            del stream[:body]


def context_batches(
    contexts: Iterable[list[int]], batch_contexts: int, skip_contexts: int = 0
) -> Iterator[torch.Tensor]:
    """LongTensor batches [batch_contexts, context_size] (the last one may be smaller) after skipping some."""
    contexts = islice(contexts, skip_contexts, None)
    while batch := list(islice(contexts, batch_contexts)):
        yield torch.tensor(batch, dtype=torch.long)


def token_contexts(data_cfg: DataConfig, tokenizer) -> Iterator[list[int]]:
    """The packed contexts of a [data] config section."""
    documents = iter_documents(data_cfg.dataset, data_cfg.split, data_cfg.text_column, data_cfg.seed)
    return pack_contexts(documents, tokenizer, data_cfg.context_size)


def token_batches(
    data: DataConfig,
    tokenizer,
    tokens: int,
    batch_contexts: int,
    skip_contexts: int = 0,
    exclude_bos: bool = True,
) -> list[torch.Tensor]:
    """Enough packed contexts of `data` for `tokens` tokens (BOS positions not counted when exclude_bos),
    after the first `skip_contexts`, as batches [batch_contexts, context_size].

    Pass a cache's `contexts` as `skip_contexts` to read text the cache (and so the SAE) never saw.
    """
    per_context = data.context_size - (1 if exclude_bos else 0)
    n_contexts = -(-tokens // per_context)
    contexts = islice(token_contexts(data, tokenizer), skip_contexts, skip_contexts + n_contexts)
    return list(context_batches(contexts, batch_contexts))
