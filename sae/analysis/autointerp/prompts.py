"""Examples as text: token ids to per-token strings, activating tokens marked `<<…>>`, activations as 0–10.

Prompts are few-shot and end where the model should continue, so the same text works for a base model
through `complete` (the offline default, Gemma 3 270M, is a base model) and, split into turns, through `chat`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sae.analysis.autointerp.records import Example

TokenStrings = Callable[[list[int]], list[str]]  # token ids -> the text of each token, in order

OPEN, CLOSE = "<<", ">>"


def token_strings_from_tokenizer(tokenizer) -> TokenStrings:
    """Each token's text as the difference of successive prefix decodings, so leading spaces and multi-token
    characters come out as the tokenizer writes them (per-token decode drops SentencePiece's spaces)."""

    def strings(ids: list[int]) -> list[str]:
        out, previous = [], ""
        for i in range(len(ids)):
            text = tokenizer.decode(ids[: i + 1])
            out.append(text[len(previous) :] if text.startswith(previous) else text)
            previous = text
        return out

    return strings


def mark_tokens(pieces: Sequence[str], marked: Sequence[bool]) -> str:
    """Join token texts, wrapping each run of marked tokens in one `<<…>>` (leading spaces stay outside)."""
    out, run = [], []

    def flush() -> None:
        if run:
            text = "".join(run)
            stripped = text.lstrip() or text  # a marked run of only whitespace keeps its whitespace inside
            out.append(text[: len(text) - len(stripped)] + OPEN + stripped + CLOSE)
            run.clear()

    for piece, is_marked in zip(map(one_line, pieces), marked, strict=True):
        if is_marked:
            run.append(piece)
        else:
            flush()
            out.append(piece)
    flush()
    return "".join(out)


def one_line(text: str) -> str:
    """Newlines would end the example (prompts are line-based); show them as the visible '\\n'."""
    return text.replace("\r", "").replace("\n", "\\n")


def activation_levels(example: Example, max_activation: float) -> list[int]:
    """Each token's activation as an integer 0–10 of the latent's maximum (0 only where it is exactly 0)."""
    if max_activation <= 0:
        return [0] * len(example.acts)
    return [0 if a <= 0 else max(1, min(10, round(10 * a / max_activation))) for a in example.acts]


def render_example(
    example: Example,
    token_strings: TokenStrings,
    max_activation: float,
    show_values: bool = False,
) -> str:
    pieces = token_strings(example.tokens)
    text = mark_tokens(pieces, [a > 0 for a in example.acts])
    if not show_values:
        return text
    levels = activation_levels(example, max_activation)
    values = ", ".join(f"{one_line(p).strip()!r}: {v}" for p, v in zip(pieces, levels) if v > 0)
    return f"{text} (activations: {values})"


def render_plain(example: Example, token_strings: TokenStrings) -> str:
    return one_line("".join(token_strings(example.tokens)))


def split_few_shot(prompt: str) -> list[dict[str, str]]:
    """A completion prompt 'instructions\\n\\n...final question' as chat messages: instructions as system,
    the rest as one user turn (chat models follow instructions without needing the demonstrations' turns)."""
    instructions, _, rest = prompt.partition("\n\n")
    return [{"role": "system", "content": instructions}, {"role": "user", "content": rest}]
