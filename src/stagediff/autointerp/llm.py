"""A JSON-answer client for any OpenAI-compatible endpoint, built to survive a long run.

- bounded concurrency: at most ``max_concurrency`` requests in flight, whatever the caller's threads;
- exponential backoff with full jitter on 429, 5xx, timeouts, dropped connections and replies
  that are not a completion (a proxy's HTML page, no ``choices``); a 429's ``Retry-After`` (in
  seconds or as an HTTP date) is honoured, capped; other 4xx fail at once, since repeating them
  cannot help. Whatever the server does, a request ends as an answer or an ``LLMFailure``;
- ``timeout_s`` is a deadline for the whole request (connect, send, every read), so a server
  trickling its reply cannot hold a request longer (httpx's own timeouts are per read);
- every answer is parsed and checked against its JSON schema, and re-asked (with the error shown
  to the model) when malformed;
- a persistent on-disk cache keyed by the SHA-256 of (model, messages, parameters), so a rerun
  sends zero requests; only valid answers are cached;
- token usage and estimated cost summed into the caller's ``Usage`` (one per feature);
- the API key is read from the environment variable the config names and handed to the openai
  client only: it never enters a log line, a result, a cache file or a config dump.
"""
from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import httpcore
import httpx
import jsonschema
import openai

from stagediff.config import looks_like_a_key
from stagediff.io import atomic_file, read_json

log = logging.getLogger(__name__)
RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError)


class LLMFailure(RuntimeError):
    """A request that could not be answered: ``kind`` is rate_limit, server, timeout, connection,
    invalid_reply (not a completion), client_error or malformed (not the schema after re-asks)."""

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


class InvalidReply(Exception):
    """A 2xx reply that is not a chat completion (HTML, other JSON, no choices or no content)."""


def _failure_kind(e: Exception) -> str:
    return {openai.RateLimitError: "rate_limit", openai.InternalServerError: "server",
            openai.APITimeoutError: "timeout", InvalidReply: "invalid_reply"}.get(type(e), "connection")


def _answer_text(r) -> str:
    choices = getattr(r, "choices", None)
    if not choices:
        raise InvalidReply("no choices" if not isinstance(r, str) else f"not a completion: {r[:80]!r}")
    content = getattr(choices[0].message, "content", None)
    if not isinstance(content, str):
        raise InvalidReply("a choice without message content")
    return content


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header in seconds: given as seconds or as an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None  # unparseable: the backoff alone decides


class _Deadline(httpcore.SyncBackend):
    """httpcore's own sockets, with every wait (connect, each write, each read) cut to what is left
    of the calling thread's request deadline: ``end`` (time.monotonic), set per request."""

    def __init__(self):
        self.local = threading.local()

    def left(self, timeout: float | None) -> float | None:
        end = getattr(self.local, "end", None)
        if end is None:
            return timeout
        left = end - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("request deadline (autointerp.openai.timeout_s) passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _DeadlineStream(super().connect_tcp(host, port, self.left(timeout), local_address, socket_options), self)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner, clock: _Deadline):
        self.inner, self.clock = inner, clock

    def read(self, max_bytes, timeout=None):
        return self.inner.read(max_bytes, self.clock.left(timeout))

    def write(self, buffer, timeout=None):
        self.inner.write(buffer, self.clock.left(timeout))

    def close(self):
        self.inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _DeadlineStream(self.inner.start_tls(ssl_context, server_hostname, self.clock.left(timeout)), self.clock)

    def get_extra_info(self, info):
        return self.inner.get_extra_info(info)


def _http_client(base_url: str, clock: _Deadline) -> httpx.Client:
    """An httpx client whose connections (direct, or through the environment's proxy for this
    URL) use ``clock``'s sockets. httpx has no network-backend option, so the transport's
    connection pool is replaced (tests/test_autointerp.py's trickle test catches an httpx change)."""
    url = httpx.URL(base_url)
    proxy = None if urllib.request.proxy_bypass(url.host) else urllib.request.getproxies().get(url.scheme)
    transport = httpx.HTTPTransport()
    ssl = httpx.create_ssl_context()
    transport._pool = (httpcore.HTTPProxy(proxy_url=proxy, ssl_context=ssl, network_backend=clock) if proxy else
                       httpcore.ConnectionPool(ssl_context=ssl, network_backend=clock))
    return httpx.Client(transport=transport, trust_env=False)


class LLMClient:
    def __init__(self, cfg: dict, cache_dir: str | Path):
        key = os.environ.get(cfg["api_key_env"])
        if not key:
            name = "(its value, which looks like a key, is not shown)" if looks_like_a_key(cfg["api_key_env"]) \
                else cfg["api_key_env"]
            raise LLMFailure("client_error", f"config key autointerp.openai.api_key_env: environment variable "
                                             f"{name} is not set")
        self.cfg = cfg
        self._clock = _Deadline()
        self._client = openai.OpenAI(base_url=cfg["base_url"], api_key=key, max_retries=0, timeout=cfg["timeout_s"],
                                     http_client=_http_client(cfg["base_url"], self._clock))
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
            try:
                answer = read_json(path)["answer"]
                jsonschema.validate(answer, schema)
                self._count(usage, Usage(cached=1))
                return answer
            except (ValueError, KeyError, TypeError, jsonschema.ValidationError) as e:
                log.warning("%s: damaged cache entry (%s): asked again", path, type(e).__name__)
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
                    self._clock.local.end = time.monotonic() + self.cfg["timeout_s"]
                    try:
                        r = self._client.chat.completions.create(
                            model=self.cfg["model"], messages=messages, temperature=self.cfg["temperature"],
                            response_format={"type": "json_object"})
                        text = _answer_text(r)
                    except (ValueError, openai.APIResponseValidationError) as e:  # e.g. JSON that does not parse
                        raise InvalidReply(type(e).__name__) from None
                    finally:
                        self._clock.local.end = None
            except (*RETRYABLE, InvalidReply) as e:
                kind = _failure_kind(e)
                if attempt == self.cfg["max_retries"]:
                    self._count(usage, Usage(failures=1))
                    raise LLMFailure(kind, f"gave up after {attempt + 1} attempts"
                                           + (f" ({e})" if isinstance(e, InvalidReply) else "")) from None
                delay = self._jitter.uniform(0, min(self.cfg["backoff_max_s"], self.cfg["backoff_s"] * 2**attempt))
                retry_after = retry_after_s(getattr(getattr(e, "response", None), "headers", {}).get("retry-after"))
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self.cfg["backoff_max_s"]))
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
            return text
        raise AssertionError("unreachable")

    def _count(self, usage: Usage, delta: Usage) -> None:
        with self._lock:
            usage.add(delta)
