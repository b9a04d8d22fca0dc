"""LLM clients behind one small async interface: `complete` (a raw prompt) and `chat` (messages).

`OpenAIClient` speaks the OpenAI-compatible HTTP API that vLLM, llama.cpp's server, ollama and OpenAI all
serve: legacy completions and chat completions, with per-token logprobs. It limits concurrency (a
semaphore), spaces request starts (rate limit), retries transient failures (connection errors, timeouts,
429, 5xx) with exponential backoff and jitter, and raises `RequestFailed` once retries are spent, so the
caller counts the failure instead of losing it.

`LlamaCppClient` runs a GGUF in process through llama-cpp-python (no server), for the offline default.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


@dataclass
class TokenLogprob:
    """One generated token, its logprob, and the top alternatives at that position (token text -> logprob)."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class Completion:
    text: str  # with echo: the prompt followed by the generated text
    logprobs: list[TokenLogprob] | None  # None when logprobs were not asked for (or the server sent none)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    latency_s: float
    text_offsets: list[int] | None = None  # each logprobs token's character offset in `text`, when sent


class Client(Protocol):
    """What explainers and scorers need from an LLM; every backend implements exactly this."""

    async def complete(
        self,
        prompt: str,
        max_tokens: int,
        logprobs: int = 0,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        echo: bool = False,
    ) -> Completion:
        """echo: also return the prompt's tokens with their logprobs (what the simulation and intervention
        scorers read); a server that ignores echo returns no prompt logprobs, which they count as failures."""
        ...

    async def chat(
        self,
        messages: list[Message],
        max_tokens: int,
        logprobs: int = 0,
        stop: list[str] | None = None,
        temperature: float = 0.0,
    ) -> Completion: ...


class RequestFailed(RuntimeError):
    """A request that did not succeed after all retries (or could not: a 4xx other than 429)."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


class RateLimiter:
    """Spaces request starts at least 1/requests_per_second apart (no limit when None)."""

    def __init__(self, requests_per_second: float | None):
        if requests_per_second is not None and requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be positive or None, got {requests_per_second}")
        self.interval = 0.0 if requests_per_second is None else 1.0 / requests_per_second
        self.next_start = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if self.interval == 0.0:
            return
        async with self.lock:  # reserve the next slot under the lock, sleep outside it
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        await asyncio.sleep(start - now)


# Transient by HTTP semantics: worth retrying. Other 4xx (bad request, unknown model) will not improve.
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class OpenAIClient:
    """An OpenAI-compatible server at `base_url` (e.g. http://127.0.0.1:8000/v1).

    Use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        model: str = "default",
        api_key: str | None = None,
        max_concurrency: int = 8,
        requests_per_second: float | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ):
        import httpx  # the only HTTP dependency (extra "autointerp")

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_concurrency),
        )
        self.model = model
        self.semaphore = asyncio.Semaphore(max_concurrency)
        self.rate_limiter = RateLimiter(requests_per_second)
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.retries = 0  # total retried attempts over this client's life, for reports

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def complete(
        self,
        prompt: str,
        max_tokens: int,
        logprobs: int = 0,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        echo: bool = False,
    ) -> Completion:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if echo:
            body["echo"] = True
        if logprobs:
            body["logprobs"] = logprobs  # legacy completions: number of top alternatives per token
        if stop:
            body["stop"] = stop
        return await self._post("completions", body, parse_completion_choice)

    async def chat(
        self,
        messages: list[Message],
        max_tokens: int,
        logprobs: int = 0,
        stop: list[str] | None = None,
        temperature: float = 0.0,
    ) -> Completion:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if logprobs:
            body["logprobs"], body["top_logprobs"] = True, logprobs
        if stop:
            body["stop"] = stop
        return await self._post("chat/completions", body, parse_chat_choice)

    async def _post(self, path: str, body: dict[str, Any], parse_choice) -> Completion:
        import httpx

        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            async with self.semaphore:
                await self.rate_limiter.wait()
                started = time.monotonic()
                try:
                    response = await self.http.post(path, json=body)
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    last_error, retry_after = f"{type(e).__name__}: {e}", None
                else:
                    if response.status_code == 200:
                        return _completion(
                            response.json(),
                            parse_choice,
                            time.monotonic() - started,
                            self.http.base_url,
                            path,
                        )
                    last_error = f"HTTP {response.status_code}: {response.text[:300]}"
                    if response.status_code not in RETRY_STATUS:
                        raise RequestFailed(f"{self.http.base_url}{path}: {last_error}", attempt + 1)
                    retry_after = _retry_after_seconds(response.headers.get("retry-after"))
            if attempt < self.max_retries:
                await asyncio.sleep(retry_after if retry_after is not None else self._backoff(attempt))
        raise RequestFailed(
            f"{self.http.base_url}{path}: {last_error} (after {self.max_retries + 1} attempts)",
            self.max_retries + 1,
        )

    def _backoff(self, attempt: int) -> float:
        """Exponential with full jitter, so many waiting requests do not retry in lockstep."""
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))


def _retry_after_seconds(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:  # an HTTP date: rare from LLM servers; the exponential backoff applies instead
        return None


def _completion(payload: dict[str, Any], parse_choice, latency_s: float, base_url, path: str) -> Completion:
    try:
        choice = payload["choices"][0]
        text, logprobs = parse_choice(choice)
        usage = payload.get("usage") or {}
        offsets = (
            (choice.get("logprobs") or {}).get("text_offset")
            if parse_choice is parse_completion_choice
            else None
        )
        return Completion(
            text=text,
            logprobs=logprobs,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=choice.get("finish_reason"),
            latency_s=latency_s,
            text_offsets=[int(o) for o in offsets] if offsets is not None else None,
        )
    except (KeyError, IndexError, TypeError, ValueError) as e:
        # A 200 with a body we cannot read is the server's bug, not a transient failure: no retry.
        raise RequestFailed(
            f"{base_url}{path}: unexpected response body ({type(e).__name__}: {e}): {str(payload)[:300]}", 1
        ) from e


def parse_completion_choice(choice: dict[str, Any]) -> tuple[str, list[TokenLogprob] | None]:
    """Legacy completions: logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}]}."""
    lp = choice.get("logprobs")
    if not lp:
        return choice["text"], None
    tops = lp.get("top_logprobs") or [{}] * len(lp["tokens"])
    return choice["text"], [  # with echo the first prompt token has no logprob (null): kept as -inf, top {}
        TokenLogprob(token, _finite(logprob), {t: _finite(v) for t, v in (top or {}).items()})
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], tops)
    ]


def parse_chat_choice(choice: dict[str, Any]) -> tuple[str, list[TokenLogprob] | None]:
    """Chat completions: logprobs = {content: [{token, logprob, top_logprobs: [{token, logprob}]}]}."""
    text = choice["message"]["content"] or ""
    lp = choice.get("logprobs")
    if not lp or lp.get("content") is None:
        return text, None
    return text, [
        TokenLogprob(
            item["token"],
            _finite(item["logprob"]),
            {alt["token"]: _finite(alt["logprob"]) for alt in item.get("top_logprobs") or []},
        )
        for item in lp["content"]
    ]


def _finite(logprob: float | None) -> float:
    """Some servers send null or -9999 for impossible tokens; keep them as -inf, not as a number."""
    return -math.inf if logprob is None or logprob <= -9999 else float(logprob)


class LlamaCppClient:
    """A GGUF model in this process via llama-cpp-python. llama.cpp contexts are not thread-safe, so
    requests run one at a time in a worker thread; the event loop stays free for other work.

    Greedy completions (temperature 0, all the pipeline asks for) are decoded here rather than through
    `create_completion`, whose logprobs sort the whole vocabulary in Python at every position: 0.4 s per
    token with Gemma's 262k vocabulary (measured), 40 s for one echoed 100-token prompt. Here the top
    alternatives come from `argpartition`, and a prompt that shares a prefix with the previous one (the
    few-shot demonstrations) reuses its KV cache. Sampling (temperature > 0) goes through llama-cpp-python.
    """

    def __init__(self, model_path: str, n_ctx: int = 2048, n_threads: int = 1, seed: int = 0):
        from llama_cpp import Llama  # extra "autointerp-local"

        # logits_all: logprobs need every position's logits (as llama-cpp-python's server keeps by default);
        # with Gemma's 262k vocabulary that is 1 MB per context position.
        self.llm = Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            seed=seed,
            logits_all=True,
            verbose=False,
        )
        self.lock = asyncio.Lock()

    async def complete(
        self,
        prompt: str,
        max_tokens: int,
        logprobs: int = 0,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        echo: bool = False,
    ) -> Completion:
        if temperature == 0.0:
            return await self._locked(self._greedy, prompt, max_tokens, logprobs, stop or [], echo)
        kwargs = dict(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop or [],
            logprobs=logprobs or None,
            echo=echo,
        )
        return await self._locked(
            self._library_call, self.llm.create_completion, kwargs, parse_completion_choice
        )

    async def chat(
        self,
        messages: list[Message],
        max_tokens: int,
        logprobs: int = 0,
        stop: list[str] | None = None,
        temperature: float = 0.0,
    ) -> Completion:
        kwargs = dict(
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop or [],
            logprobs=bool(logprobs),
            top_logprobs=logprobs or None,
        )
        return await self._locked(
            self._library_call, self.llm.create_chat_completion, kwargs, parse_chat_choice
        )

    async def _locked(self, function, *args) -> Completion:
        async with self.lock:
            started = time.monotonic()
            try:
                completion = await asyncio.to_thread(function, *args)
            except (RuntimeError, ValueError) as e:  # e.g. prompt longer than n_ctx
                raise RequestFailed(f"llama.cpp: {type(e).__name__}: {e}", 1) from e
        completion.latency_s = time.monotonic() - started
        return completion

    def _library_call(self, method, kwargs: dict[str, Any], parse_choice) -> Completion:
        self.llm.reset()  # our greedy path may have left the context mid-sequence
        return _completion(method(**kwargs), parse_choice, 0.0, "llama.cpp:", method.__name__)

    def _evaluate(self, tokens: list[int]) -> None:
        """Bring the context to exactly `tokens`, reusing the cached prefix when llama.cpp can cut its
        KV cache."""
        llm = self.llm
        if len(tokens) > llm.n_ctx():
            raise ValueError(f"prompt of {len(tokens)} tokens exceeds the context of {llm.n_ctx()}")
        cached = llm.input_ids[: llm.n_tokens]
        prefix = 0
        for a, b in zip(cached.tolist(), tokens):
            if a != b:
                break
            prefix += 1
        prefix = min(prefix, len(tokens) - 1)  # re-evaluate at least one token: its logits are needed
        if prefix > 0 and llm._ctx.kv_cache_seq_rm(-1, prefix, -1):
            llm.n_tokens = prefix
        else:
            llm.reset()
        llm.eval(tokens[llm.n_tokens :])

    def _top(self, row, logprobs: int, context: list[int]) -> tuple[Any, dict[str, float]]:
        """Log-softmax of one logits row and its `logprobs` most likely tokens as text -> logprob."""
        import numpy as np

        shifted = row - row.max()
        log_probs = shifted - np.log(np.exp(shifted).sum())
        if not logprobs:
            return log_probs, {}
        best = np.argpartition(-log_probs, logprobs)[:logprobs]
        top: dict[str, float] = {}
        for i in best[np.argsort(-log_probs[best])].tolist():
            text = self.llm.detokenize([i], prev_tokens=context).decode("utf-8", errors="ignore")
            top.setdefault(text, float(log_probs[i]))  # two ids with one text: keep the likelier
        return log_probs, top

    def _greedy(self, prompt: str, max_tokens: int, logprobs: int, stop: list[str], echo: bool) -> Completion:
        llm = self.llm
        prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        self._evaluate(prompt_ids)
        has_bos = prompt_ids[0] == llm.token_bos()
        first = 1 if has_bos else 0
        entries: list[TokenLogprob] = []
        offsets: list[int] = []
        if echo and logprobs:
            for position in range(first, len(prompt_ids)):
                token = prompt_ids[position]
                context = prompt_ids[first:position]
                token_text = llm.detokenize([token], prev_tokens=context).decode("utf-8", errors="ignore")
                offsets.append(len(llm.detokenize(context).decode("utf-8", errors="ignore")))
                if position == 0:  # no BOS: nothing predicts the first token
                    entries.append(TokenLogprob(token_text, -math.inf, {}))
                    continue
                log_probs, top = self._top(llm.scores[position - 1], logprobs, context)
                entries.append(TokenLogprob(token_text, float(log_probs[token]), top))

        generated: list[int] = []
        text, finish = "", "length"
        while len(generated) < max_tokens:
            context = prompt_ids[first:] + generated
            row = llm.scores[llm.n_tokens - 1]
            token = int(row.argmax())
            if token == llm.token_eos():
                finish = "stop"
                break
            new_text = llm.detokenize([*generated, token], prev_tokens=prompt_ids[first:]).decode(
                "utf-8", errors="ignore"
            )
            hit = min((new_text.find(s) for s in stop if s in new_text), default=-1)
            if hit >= 0:
                text, finish = new_text[:hit], "stop"
                break
            if logprobs:
                log_probs, top = self._top(row, logprobs, context)
                token_text = llm.detokenize([token], prev_tokens=context).decode("utf-8", errors="ignore")
                offsets.append((len(prompt) if echo else 0) + len(text))
                entries.append(TokenLogprob(token_text, float(log_probs[token]), top))
            generated.append(token)
            text = new_text
            if len(generated) < max_tokens:
                llm.eval([token])
        return Completion(
            text=(prompt + text) if echo else text,
            logprobs=entries if logprobs else None,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(generated),
            finish_reason=finish,
            latency_s=0.0,
            text_offsets=offsets if logprobs else None,
        )
