"""Circuit-discovery tasks: clean and corrupted prompts of equal length, answer tokens, one metric.

A `Task` holds plain tensors only, so a study can build one from anything:

    clean_tokens, corrupted_tokens: [prompts, pos]  (same length; position i of both lines up)
    good_tokens, bad_tokens:        [prompts, n]    token ids, padded with -1

Metrics (computed from the logits at the last position, one value per prompt):
    logit_diff           mean logit(good) - mean logit(bad)          (IOI: logit(IO) - logit(S))
    prob_diff            sum p(good) - sum p(bad)                     (greater-than)
    logit_minus_max_bad  logit(good[0]) - max logit(bad)              (docstring)
    logprob              log p(good[0])                               (induction)
A prompt is *solved* when its metric is positive (for `logprob`: when good[0] is the top prediction).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch
from torch import Tensor

METRICS = ("logit_diff", "prob_diff", "logit_minus_max_bad", "logprob")


@dataclass
class Task:
    name: str
    clean_tokens: Tensor  # [prompts, pos]
    corrupted_tokens: Tensor  # [prompts, pos]
    good_tokens: Tensor  # [prompts, n_good], -1 padded
    bad_tokens: Tensor  # [prompts, n_bad], -1 padded
    metric: str

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name}: unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        n = len(self.clean_tokens)
        if self.clean_tokens.shape != self.corrupted_tokens.shape:
            raise ValueError(
                f"task {self.name}: clean tokens {tuple(self.clean_tokens.shape)} and corrupted "
                f"tokens {tuple(self.corrupted_tokens.shape)} must have the same shape"
            )
        for field_name in ("good_tokens", "bad_tokens"):
            t = getattr(self, field_name)
            if t.ndim != 2 or len(t) != n:
                raise ValueError(f"task {self.name}: {field_name} must be [{n}, n], got {tuple(t.shape)}")
        if (self.good_tokens[:, 0] < 0).any():
            raise ValueError(f"task {self.name}: every prompt needs at least one good token")

    def __len__(self) -> int:
        return len(self.clean_tokens)

    def select(self, index: Tensor) -> Task:
        """The prompts at `index` (a bool mask or indices)."""
        return replace(
            self,
            clean_tokens=self.clean_tokens[index],
            corrupted_tokens=self.corrupted_tokens[index],
            good_tokens=self.good_tokens[index],
            bad_tokens=self.bad_tokens[index],
        )


def _gather(values: Tensor, tokens: Tensor, fill: float) -> Tensor:
    """values [prompts, vocab], tokens [prompts, n] (-1 padded) -> [prompts, n], `fill` at padding."""
    picked = values.gather(-1, tokens.clamp(min=0))
    return picked.masked_fill(tokens < 0, fill)


def task_metric(task: Task, last_logits: Tensor) -> Tensor:
    """last_logits [prompts, vocab] -> metric [prompts] (float32)."""
    logits = last_logits.float()
    good, bad = task.good_tokens.to(logits.device), task.bad_tokens.to(logits.device)
    if task.metric == "logit_diff":

        def mean(t: Tensor) -> Tensor:
            return _gather(logits, t, 0.0).sum(-1) / (t >= 0).sum(-1).clamp(min=1)

        return mean(good) - mean(bad)
    if task.metric == "prob_diff":
        probs = logits.softmax(-1)
        return _gather(probs, good, 0.0).sum(-1) - _gather(probs, bad, 0.0).sum(-1)
    if task.metric == "logit_minus_max_bad":
        return logits.gather(-1, good[:, :1])[:, 0] - _gather(logits, bad, float("-inf")).max(-1).values
    return logits.log_softmax(-1).gather(-1, good[:, :1])[:, 0]


def task_solved(task: Task, last_logits: Tensor) -> Tensor:
    """[prompts] bool: does the model get each prompt right (see the module docstring)?"""
    if task.metric == "logprob":
        return last_logits.argmax(-1) == task.good_tokens[:, 0].to(last_logits.device)
    return task_metric(task, last_logits) > 0


# --- tokens -----------------------------------------------------------------------------------------


def single_token_ids(tokenizer, words: list[str], need: int, what: str) -> dict[str, int]:
    """The words (with their leading space, if any) that are one token for `tokenizer`.

    Raises if fewer than `need` are, naming the tokenizer and the words that failed: a task built from
    multi-token names would measure something else without saying so.
    """
    found, failed = {}, []
    for word in words:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:  # <unk> is one token but not the word
            found[word] = ids[0]
        else:
            failed.append(word)
    if len(found) < need:
        raise ValueError(
            f"{what}: only {len(found)} of {len(words)} candidates are single tokens for "
            f"{type(tokenizer).__name__} (need {need}); not single: {failed[:10]}"
        )
    return found


def encode_prompts(tokenizer, prompts: list[str], what: str) -> Tensor:
    """[prompts, pos] token ids with the tokenizer's BOS first (when it has one); all must have one length."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        by_length = {
            n: next(p for p, r in zip(prompts, rows, strict=True) if len(r) == n) for n in sorted(lengths)
        }
        raise ValueError(
            f"{what}: prompts tokenise to different lengths {sorted(lengths)}, e.g. {by_length}; "
            "positions must line up between prompts"
        )
    return torch.tensor(rows)


def pad_ids(rows: list[list[int]]) -> Tensor:
    """Ragged lists of token ids -> [len(rows), max len], padded with -1."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])


def from_pairs(
    tokenizer,
    clean: list[str],
    corrupted: list[str],
    good: list[list[str]],
    bad: list[list[str]],
    metric: str = "logit_diff",
    name: str = "custom",
) -> Task:
    """A task from clean/corrupted prompt pairs and, per prompt, answer strings (each one token)."""
    if not (len(clean) == len(corrupted) == len(good) == len(bad)):
        raise ValueError(
            f"task {name}: clean, corrupted, good and bad need one entry per prompt, got "
            f"{len(clean)}, {len(corrupted)}, {len(good)}, {len(bad)}"
        )
    words = sorted({w for ws in good + bad for w in ws})
    ids = single_token_ids(tokenizer, words, need=len(words), what=f"task {name} answers")
    return Task(
        name,
        encode_prompts(tokenizer, clean, f"task {name} clean"),
        encode_prompts(tokenizer, corrupted, f"task {name} corrupted"),
        pad_ids([[ids[w] for w in ws] for ws in good]),
        pad_ids([[ids[w] for w in ws] for ws in bad]),
        metric,
    )


# --- the standard tasks -----------------------------------------------------------------------------

NAMES = [
    " Mary",
    " John",
    " Tom",
    " James",
    " Dan",
    " Sid",
    " Martin",
    " Amy",
    " Anna",
    " Kate",
    " Paul",
    " Lisa",
    " Mark",
    " Sarah",
    " David",
    " Laura",
    " Peter",
    " Emma",
    " Alex",
    " Ben",
    " Jack",
    " Lucy",
    " Sam",
    " Rose",
    " Max",
    " Grace",
    " Adam",
    " Ruth",
    " Jane",
    " Mike",
]
IOI_TEMPLATE = "Then,{B} and{A} went to the{PLACE}.{C} gave a{OBJECT} to"
PLACES = [" store", " park", " school", " house", " station", " garden", " market", " beach", " office"]
OBJECTS = [" ring", " book", " drink", " bone", " kiss", " bag", " ball", " key", " letter", " flower"]


def ioi(tokenizer, n: int, seed: int = 0) -> Task:
    """Indirect object identification, half ABBA and half BABA ("Then, B and A went ... B gave a ... to"
    -> A).

    Corrupted prompts are ABC-style: the second subject mention becomes a third name, so the sentence no
    longer says who the indirect object is. Metric: logit(IO) - logit(S).
    """
    names = list(single_token_ids(tokenizer, NAMES, need=3, what="IOI names"))
    places = list(single_token_ids(tokenizer, PLACES, need=1, what="IOI places"))
    objects = list(single_token_ids(tokenizer, OBJECTS, need=1, what="IOI objects"))
    rng = random.Random(seed)
    clean, corrupted, good, bad = [], [], [], []
    for i in range(n):
        io, s, third = rng.sample(names, 3)
        first, second = (s, io) if i % 2 == 0 else (io, s)  # ABBA: subject first; BABA: IO first
        fill = dict(A=second, B=first, PLACE=rng.choice(places), OBJECT=rng.choice(objects))
        clean.append(IOI_TEMPLATE.format(C=s, **fill))
        corrupted.append(IOI_TEMPLATE.format(C=third, **fill))
        good.append([io])
        bad.append([s])
    return from_pairs(tokenizer, clean, corrupted, good, bad, "logit_diff", "ioi")


GREATER_THAN_NOUNS = [
    " war",
    " dynasty",
    " reign",
    " expedition",
    " strike",
    " drought",
    " trial",
    " project",
    " conflict",
    " empire",
    " crisis",
    " campaign",
]


def greater_than(tokenizer, n: int, seed: int = 0, century: int = 17) -> Task:
    """ "The {noun} lasted from the year {XX}{YY} to the year {XX}" -> a YY' > YY (Hanna et al. 2023).

    Corrupted: YY = 01. Metric: sum p(YY' > YY) - sum p(YY' <= YY) over the two-digit year tokens.
    Needs every two-digit string "00".."99" and the century "{XX}" to be single tokens.
    """
    years = single_token_ids(
        tokenizer,
        [f"{y:02d}" for y in range(100)],
        need=100,
        what="greater-than years (tokenizers that split numbers into digits, such as "
        "Gemma's, cannot pose this task)",
    )
    single_token_ids(tokenizer, [f" {century}"], need=1, what="greater-than century")
    nouns = list(single_token_ids(tokenizer, GREATER_THAN_NOUNS, need=1, what="greater-than nouns"))
    rng = random.Random(seed)
    template = "The{noun} lasted from the year {XX}{YY} to the year {XX}"
    clean, corrupted, good, bad = [], [], [], []
    for _ in range(n):
        noun, yy = rng.choice(nouns), rng.randint(2, 98)
        clean.append(template.format(noun=noun, XX=century, YY=f"{yy:02d}"))
        corrupted.append(template.format(noun=noun, XX=century, YY="01"))
        good.append([years[f"{y:02d}"] for y in range(yy + 1, 100)])
        bad.append([years[f"{y:02d}"] for y in range(0, yy + 1)])
    return Task(
        "greater_than",
        encode_prompts(tokenizer, clean, "greater-than clean"),
        encode_prompts(tokenizer, corrupted, "greater-than corrupted"),
        pad_ids(good),
        pad_ids(bad),
        "prob_diff",
    )


def greater_than_digits(tokenizer, n: int, seed: int = 0, century: int = 17) -> Task:
    """Greater-than for tokenizers that split numbers into digits (Gemma's): the prompt stops after the
    century, "The{noun} lasted from the year {XX}{T}{U} to the year {XX}", and the answer is the next
    digit, the tens digit of the end year. Good: tens digits > T (the end year is later whatever comes
    next); bad: tens digits < T. The digit T itself is left out (its years can go either way).
    Corrupted: the start year is {XX}01 (Hanna et al.'s corruption). Metric: prob_diff, as the original.
    T runs over 1..8 so both answer sets are non-empty.
    """
    digits = single_token_ids(tokenizer, [str(d) for d in range(10)], need=10, what="greater-than digits")
    for year in (f" {century}32", f" {century}"):  # the year must split into single digits, positions line up
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(year, add_special_tokens=False)]
        if pieces[-2:] != list(year[-2:]):
            raise ValueError(
                f"greater_than_digits needs a tokenizer that splits years into digits; "
                f"{type(tokenizer).__name__} gives {pieces} for {year!r} (use greater_than)"
            )
    nouns = list(single_token_ids(tokenizer, GREATER_THAN_NOUNS, need=1, what="greater-than nouns"))
    rng = random.Random(seed)
    template = "The{noun} lasted from the year {XX}{YY} to the year {XX}"
    clean, corrupted, good, bad = [], [], [], []
    for _ in range(n):
        noun, tens, units = rng.choice(nouns), rng.randint(1, 8), rng.randint(0, 9)
        clean.append(template.format(noun=noun, XX=century, YY=f"{tens}{units}"))
        corrupted.append(template.format(noun=noun, XX=century, YY="01"))
        good.append([digits[str(d)] for d in range(tens + 1, 10)])
        bad.append([digits[str(d)] for d in range(0, tens)])
    return Task(
        "greater_than_digits",
        encode_prompts(tokenizer, clean, "greater-than clean"),
        encode_prompts(tokenizer, corrupted, "greater-than corrupted"),
        pad_ids(good),
        pad_ids(bad),
        "prob_diff",
    )


def induction(
    vocab: list[int], n: int, half: int = 10, query: int = 6, bos: int | None = None, seed: int = 0
) -> Task:
    """Repeated random tokens: clean = [A_1..A_half, A_1..A_query] -> A_{query+1}.

    Corrupted prompts replace the first half by other random tokens (B), so nothing predicts A_{query+1}.
    Metric: logit(A_{query+1}) minus the mean logit of the other A tokens (a log-probability saturates
    near 0 in a model that has learnt induction, hiding every single-head effect). Built from token
    ids, for models with any (or no) tokenizer.
    """
    if not 0 < query < half or len(vocab) < 2 * half:
        raise ValueError(
            f"induction task needs 0 < query ({query}) < half ({half}) and at least "
            f"{2 * half} vocabulary tokens, got {len(vocab)}"
        )
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor(vocab)
    clean, corrupted, good, bad = [], [], [], []
    for _ in range(n):
        perm = pool[torch.randperm(len(pool), generator=generator)]
        a, b = perm[:half], perm[half : 2 * half]  # disjoint, so the corruption shares no token with A
        prefix = [bos] if bos is not None else []
        clean.append(prefix + a.tolist() + a[:query].tolist())
        corrupted.append(prefix + b.tolist() + a[:query].tolist())
        good.append([int(a[query])])
        bad.append([int(t) for i, t in enumerate(a) if i != query])
    return Task(
        "induction",
        torch.tensor(clean),
        torch.tensor(corrupted),
        torch.tensor(good),
        torch.tensor(bad),
        "logit_diff",
    )


ARGUMENT_NAMES = [
    " file",
    " name",
    " data",
    " size",
    " value",
    " path",
    " key",
    " index",
    " count",
    " mode",
    " text",
    " user",
    " item",
    " config",
    " result",
    " model",
    " state",
    " port",
    " host",
    " line",
    " url",
    " token",
    " source",
    " target",
    " limit",
    " order",
    " field",
    " label",
    " group",
    " node",
]
FUNCTION_NAMES = [
    " load",
    " save",
    " run",
    " check",
    " update",
    " create",
    " read",
    " write",
    " parse",
    " send",
]
DESCRIPTION_WORDS = [
    " the",
    " new",
    " old",
    " first",
    " last",
    " main",
    " current",
    " default",
    " local",
    " next",
]
DOCSTRING_TEMPLATE = (
    'def{fn}(self,{a0},{a1},{a2},{a3},{a4}):\n    """{w0}{w1}\n\n'
    "    :param{d0}:{w2}{w3}\n    :param{d1}:{w4}{w5}\n    :param"
)


def docstring(tokenizer, n: int, seed: int = 0) -> Task:
    """Docstring completion (Heimersheim & Janiak 2023): after two documented parameters, predict the
    third argument of the signature. Metric: logit(correct) - max logit(the other arguments).

    Corrupted prompts follow ACDC's `random_random`: the signature's and the docstring's argument names
    are both replaced by fresh random names, so nothing points to the right one.
    """
    args = list(single_token_ids(tokenizer, ARGUMENT_NAMES, need=15, what="docstring argument names"))
    functions = list(single_token_ids(tokenizer, FUNCTION_NAMES, need=1, what="docstring function names"))
    words = list(single_token_ids(tokenizer, DESCRIPTION_WORDS, need=2, what="docstring description words"))
    ids = {a: tokenizer.encode(a, add_special_tokens=False)[0] for a in args}
    rng = random.Random(seed)
    clean, corrupted, good, bad = [], [], [], []
    for _ in range(n):
        names = rng.sample(args, 15)
        signature, fresh_signature, fresh_doc = names[:5], names[5:10], names[10:12]
        text = dict(fn=rng.choice(functions), **{f"w{i}": rng.choice(words) for i in range(6)})
        clean.append(
            DOCSTRING_TEMPLATE.format(
                **text, **{f"a{i}": a for i, a in enumerate(signature)}, d0=signature[0], d1=signature[1]
            )
        )
        corrupted.append(
            DOCSTRING_TEMPLATE.format(
                **text,
                **{f"a{i}": a for i, a in enumerate(fresh_signature)},
                d0=fresh_doc[0],
                d1=fresh_doc[1],
            )
        )
        good.append([ids[signature[2]]])
        bad.append([ids[a] for a in signature if a != signature[2]])
    return Task(
        "docstring",
        encode_prompts(tokenizer, clean, "docstring clean"),
        encode_prompts(tokenizer, corrupted, "docstring corrupted"),
        pad_ids(good),
        pad_ids(bad),
        "logit_minus_max_bad",
    )


def ordinary_token_ids(tokenizer, d_vocab: int, limit: int = 20_000) -> list[int]:
    """The first `limit` ids of the model's vocabulary that are neither special nor added tokens (Gemma's
    <pad>, <unusedN>, <start_of_turn>, ..., a toy's <unk>) and that the tokenizer knows (a model's
    embedding may be wider than its tokenizer's vocabulary); every id below d_vocab without a tokenizer."""
    if tokenizer is None:
        return list(range(min(d_vocab, limit)))
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    known = min(d_vocab, len(tokenizer))
    return [i for i in range(known) if i not in excluded][:limit]


TASK_NAMES = ("ioi", "greater_than", "greater_than_digits", "docstring", "induction")


def build_task(name: str, model, n: int, seed: int = 0) -> Task:
    """One of TASK_NAMES, posed for `model` (a TransformerBridge: its tokenizer, or for induction its
    vocabulary size): n prompt pairs drawn with `seed`."""
    if name == "ioi":
        return ioi(model.tokenizer, n, seed)
    if name == "greater_than":
        return greater_than(model.tokenizer, n, seed)
    if name == "greater_than_digits":
        return greater_than_digits(model.tokenizer, n, seed)
    if name == "docstring":
        return docstring(model.tokenizer, n, seed)
    if name == "induction":
        vocab = ordinary_token_ids(model.tokenizer, model.cfg.d_vocab)
        bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
        return induction(vocab, n, bos=bos, seed=seed)
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
