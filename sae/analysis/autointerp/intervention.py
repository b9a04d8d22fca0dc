"""Intervention scorer: does steering the latent make the model write what the explanation says?

Per latent (after Paulo et al.'s output-centric scoring and REFERENCES.md):
  1. calibrate: bisection on the additive steering strength (units of the latent's max activation) until
     the subject model's mean next-token KL on neutral prompts reaches `target_kl`
     (`steering.calibrate_to_kl`);
  2. generate: greedy completions of the same neutral prompts, clean (once for all latents) and steered;
  3. judge: the LLM's log-likelihood of "This text is about {explanation}" after each completion, per token
     of the explanation; the score is the mean over prompts of steered minus clean (`logprob_gain`), and the
     fraction of prompts where the steered completion makes the explanation likelier (`win_rate`).

Steps 1–2 depend only on the latent, so the shuffled control explanation is judged on the same completions.
The subject model runs in a worker thread under one lock (its hooks are model-wide state); a latent whose
KL never reaches the target, or a judge response without prompt logprobs, is a counted failure.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sae.analysis.autointerp.clients import Client, Completion, RequestFailed
from sae.analysis.autointerp.prompts import one_line
from sae.analysis.autointerp.records import LatentRecord
from sae.analysis.autointerp.scorers import Score
from sae.analysis.steering import NEUTRAL_PROMPTS, Intervention, calibrate_to_kl, generate, strength_in_units

JUDGE_SUFFIX = "\nThis text is about"


@dataclass
class InterventionConfig:
    target_kl: float = 0.5  # mean next-token KL(clean || steered) on the neutral prompts (REFERENCES: 0.5–1)
    prompts: tuple[str, ...] = NEUTRAL_PROMPTS[:4]
    max_new_tokens: int = 16
    calibration_iterations: int = 6  # bisection steps after bracketing: alpha to within 1/64 of the bracket


@dataclass
class SteeredCompletions:
    alpha: float | None
    kl: float | None
    clean: list[str] = field(default_factory=list)  # prompt + completion, one per neutral prompt
    steered: list[str] = field(default_factory=list)
    failure: str | None = None


def judge_prompt(text: str, explanation: str) -> tuple[str, int]:
    """The judge's prompt, and the character offset where the explanation (with its leading space) begins."""
    head = "Text: " + one_line(text) + JUDGE_SUFFIX
    return head + " " + explanation, len(head)


def explanation_logprob(completion: Completion, start: int, end: int) -> float | None:
    """Mean logprob per token of the prompt tokens in characters [start, end) (the generated token after
    the echoed prompt is left out); None without prompt logprobs or offsets."""
    if not completion.logprobs or completion.text_offsets is None:
        return None
    values = [
        entry.logprob
        for offset, entry in zip(completion.text_offsets, completion.logprobs)
        if start <= offset < end
    ]
    return sum(values) / len(values) if values else None


class InterventionScorer:
    """Holds the subject model and SAE; `score` has the signature of the LLM scorers."""

    def __init__(self, model, sae, config: InterventionConfig | None = None):
        self.model, self.sae = model, sae
        self.config = config if config is not None else InterventionConfig()
        self.lock = asyncio.Lock()
        self.clean: list[str] | None = None
        self.by_latent: dict[int, SteeredCompletions] = {}

    def _complete(self, prompt: str, intervention: Intervention | None) -> str:
        tokens = generate(self.model, self.sae, prompt, intervention, self.config.max_new_tokens)
        return prompt + self.model.tokenizer.decode(tokens[0, self.model.to_tokens(prompt).shape[1] :])

    def _steer(self, record: LatentRecord) -> SteeredCompletions:
        prompts = self.config.prompts
        if self.clean is None:
            self.clean = [self._complete(p, None) for p in prompts]
        try:
            alpha, kl = calibrate_to_kl(
                self.model,
                self.sae,
                record.latent,
                self.config.target_kl,
                prompts,
                mode="add",
                max_activation=record.max_activation,
                iterations=self.config.calibration_iterations,
            )
        except ValueError as e:  # KL never reaches the target, or a latent that never fired (no units)
            return SteeredCompletions(None, None, self.clean, failure=f"calibration: {e}")
        intervention = Intervention(record.latent, "add", strength_in_units(alpha, record.max_activation))
        return SteeredCompletions(alpha, kl, self.clean, [self._complete(p, intervention) for p in prompts])

    async def completions(self, record: LatentRecord) -> SteeredCompletions:
        async with self.lock:
            if record.latent not in self.by_latent:
                self.by_latent[record.latent] = await asyncio.to_thread(self._steer, record)
        return self.by_latent[record.latent]

    async def score(
        self, client: Client, explanation: str, record: LatentRecord, token_strings=None, config=None
    ) -> Score:
        steered = await self.completions(record)
        info = {"alpha": steered.alpha, "kl": steered.kl, "steered": steered.steered}
        n = len(self.config.prompts)
        if steered.failure:  # counted per judgement: 2 per prompt (clean and steered)
            return Score(
                "intervention",
                {"logprob_gain": float("nan"), "win_rate": float("nan")},
                2 * n,
                0,
                errors=2 * n,
                failure_details=[steered.failure],
                info=info,
            )

        async def ask(text: str) -> tuple[Completion | RequestFailed, int, int]:
            prompt, start = judge_prompt(text, explanation)
            try:
                return await client.complete(prompt, 1, logprobs=1, echo=True), start, len(prompt)
            except RequestFailed as e:
                return e, start, len(prompt)

        answers = await asyncio.gather(*(ask(t) for t in steered.clean + steered.steered))
        gains, details = [], []
        parse_failures = errors = prompt_tokens = n_judged = 0
        for clean_answer, steered_answer in zip(answers[:n], answers[n:]):
            pair = []
            for completion, start, end in (clean_answer, steered_answer):
                if isinstance(completion, RequestFailed):
                    errors += 1
                    details.append(f"error: {completion}")
                    continue
                prompt_tokens += completion.prompt_tokens
                value = explanation_logprob(completion, start, end)
                if value is None:
                    parse_failures += 1
                    details.append(
                        "no prompt logprobs or offsets in the response (does the server support echo?)"
                    )
                else:
                    n_judged += 1
                    pair.append(value)
            if len(pair) == 2:
                gains.append(pair[1] - pair[0])
        metrics = {
            "logprob_gain": sum(gains) / len(gains) if gains else float("nan"),
            "win_rate": sum(g > 0 for g in gains) / len(gains) if gains else float("nan"),
        }
        # Counted per judgement (2 per prompt); the metrics use the prompts whose two judgements both came
        # back.
        info["prompts_compared"] = len(gains)
        return Score(
            "intervention",
            metrics,
            2 * n,
            n_judged,
            parse_failures,
            errors,
            prompt_tokens=prompt_tokens,
            failure_details=details[:5],
            info=info,
        )
