"""A JSON-answer client for any OpenAI-compatible endpoint, built to survive a long run.

- bounded concurrency: at most ``max_concurrency`` requests in flight, whatever the caller's threads;
- exponential backoff with full jitter on 429, 5xx, timeouts and dropped connections (a 429's
  ``Retry-After`` is honoured, capped); other 4xx fail at once, since repeating them cannot help;
- every answer is parsed and checked against its JSON schema, and re-asked (with the error shown
  to the model) when malformed;
- a persistent on-disk cache keyed by the SHA-256 of (model, messages, parameters), so a rerun
  sends zero requests; only valid answers are cached;
- token usage and estimated cost summed into the caller's ``Usage`` (one per feature);
- the API key is read from the environment variable the config names and handed to the openai
  client only: it never enters a log line, a result, a cache file or a config dump.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jsonschema
import openai

from stagediff.io import atomic_file

log = logging.getLogger(__name__)
RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError)


class LLMFailure(RuntimeError):
    """A request that could not be answered: ``kind`` is rate_limit, server, timeout, connection,
    client_error or malformed."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass
class Usage:
    requests: int = 0         # HTTP requests sent (retries and re-asks included)
    cached: int = 0           # answers served from the on-disk cache
    retries: int = 0
    reasks: int = 0           # malformed answers asked again
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: "Usage") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def _failure_kind(e: Exception) -> str:
    return {openai.RateLimitError: "rate_limit", openai.InternalServerError: "server",
            openai.APITimeoutError: "timeout"}.get(type(e), "connection")


class LLMClient:
    def __init__(self, cfg: dict, cache_dir: str | Path):
        key = os.environ.get(cfg["api_key_env"])
        if not key:
            raise LLMFailure("client_error", f"config key autointerp.openai.api_key_env: environment variable "
                                             f"{cfg['api_key_env']} is not set")
        self.cfg = cfg
        self._client = openai.OpenAI(base_url=cfg["base_url"], api_key=key, max_retries=0,
                                     timeout=cfg["timeout_s"])
        self._slots = threading.BoundedSemaphore(cfg["max_concurrency"])
        self._lock = threading.Lock()
        self._jitter = random.Random()  # timing only: never affects an answer
        self.cache_dir = Path(cache_dir)

    def request_hash(self, messages: list[dict]) -> str:
        params = {"model": self.cfg["model"], "temperature": self.cfg["temperature"],
                  "response_format": {"type": "json_object"}, "messages": messages}
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()

    def ask_json(self, messages: list[dict], schema: dict, usage: Usage) -> dict:
        """The answer as a dict valid under ``schema``; adds this call's requests, tokens and cost to ``usage``."""
        key = self.request_hash(messages)
        path = self.cache_dir / key[:2] / f"{key}.json"
        if path.is_file():
            self._count(usage, Usage(cached=1))
            return json.loads(path.read_text())["answer"]
        convo = list(messages)
        for attempt in range(self.cfg["max_reasks"] + 1):
            content = self._complete(convo, usage)
            try:
                answer = json.loads(content)
                jsonschema.validate(answer, schema)
            except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else e.message
                log.warning("malformed answer (attempt %d): %s", attempt + 1, reason)
                if attempt == self.cfg["max_reasks"]:
                    self._count(usage, Usage(failures=1))
                    raise LLMFailure("malformed", reason) from None
                self._count(usage, Usage(reasks=1))
                convo += [{"role": "assistant", "content": content},
                          {"role": "user", "content": f"That answer is invalid ({reason}). Reply with only a JSON "
                                                      f"object matching this schema: {json.dumps(schema)}"}]
                continue
            with atomic_file(path) as tmp:
                tmp.write_text(json.dumps({"model": self.cfg["model"], "answer": answer}, sort_keys=True))
            return answer
        raise AssertionError("unreachable")

    def _complete(self, messages: list[dict], usage: Usage) -> str:
        """One answer's text, retrying transient errors with exponential backoff and full jitter."""
        for attempt in range(self.cfg["max_retries"] + 1):
            try:
                with self._slots:
                    self._count(usage, Usage(requests=1))
                    r = self._client.chat.completions.create(
                        model=self.cfg["model"], messages=messages, temperature=self.cfg["temperature"],
                        response_format={"type": "json_object"})
            except RETRYABLE as e:
                kind = _failure_kind(e)
                if attempt == self.cfg["max_retries"]:
                    self._count(usage, Usage(failures=1))
                    raise LLMFailure(kind, f"gave up after {attempt + 1} attempts") from None
                delay = self._jitter.uniform(0, min(self.cfg["backoff_max_s"], self.cfg["backoff_s"] * 2**attempt))
                retry_after = getattr(getattr(e, "response", None), "headers", {}).get("retry-after")
                if retry_after:
                    delay = max(delay, min(float(retry_after), self.cfg["backoff_max_s"]))
                log.warning("%s (attempt %d), retrying in %.2fs", kind, attempt + 1, delay)
                self._count(usage, Usage(retries=1))
                time.sleep(delay)
                continue
            except openai.APIStatusError as e:  # other 4xx: repeating cannot help
                self._count(usage, Usage(failures=1))
                raise LLMFailure("client_error", f"HTTP {e.status_code}") from None
            u = r.usage
            p, c = (u.prompt_tokens, u.completion_tokens) if u else (0, 0)
            cost = (p * self.cfg["usd_per_1m_input"] + c * self.cfg["usd_per_1m_output"]) / 1e6
            self._count(usage, Usage(prompt_tokens=p, completion_tokens=c, cost_usd=cost))
            return r.choices[0].message.content or ""
        raise AssertionError("unreachable")

    def _count(self, usage: Usage, delta: Usage) -> None:
        with self._lock:
            usage.add(delta)
