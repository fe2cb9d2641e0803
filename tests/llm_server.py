"""A local OpenAI-compatible chat-completions server on 127.0.0.1 for the auto-interp tests.

It answers like a (very simple) model: a description for describe prompts, and for validation
prompts 1 for every sample whose prompt names a spatial relation. ``script`` can replace the
next answers with failures: ``(status, content, delay_s)``; content None = the default answer;
or a ``Reply`` for what a misbehaving server or proxy sends (a raw body, no ``choices``, a
``Retry-After`` date, a body trickled byte by byte).
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPATIAL = re.compile(r"\b(left|right|above|below)\b")


def default_answer(body: dict) -> str:
    system = body["messages"][0]["content"]
    parts = body["messages"][1]["content"]
    if "Produce *one*" in system:
        return json.dumps({"description": "questions about where objects are relative to each other"})
    samples = [p["text"] for p in parts if p["type"] == "text" and p["text"].startswith("Sample ")]
    return json.dumps({"classifications": [int(bool(SPATIAL.search(s))) for s in samples]})


@dataclass
class Reply:
    status: int = 200
    content: str | None = None  # the answer's text (None: the default answer)
    delay: float = 0.0  # seconds before the headers
    body: bytes | None = None  # sent as is instead of a completion (e.g. a proxy's HTML page)
    content_type: str = "application/json"
    choices: bool = True  # False: a completion object without "choices"
    retry_after: str = "0"  # a 429's Retry-After header: seconds or an HTTP date
    trickle_s: float = 0.0  # > 0: the body is sent one byte at a time, this far apart


class LLMServer:
    def __init__(self):
        self.requests: list[dict] = []   # {"body", "headers" (lower-case names)}
        self.script: list[tuple[int, str | None, float]] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append({"body": body, "headers": {k.lower(): v for k, v in self.headers.items()}})
                    r = server.script.pop(0) if server.script else Reply()
                    r = r if isinstance(r, Reply) else Reply(*r)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(r.delay)
                    if r.status == 200:
                        payload = {"id": "cmpl-test", "object": "chat.completion", "created": 0,
                                   "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                       "role": "assistant",
                                       "content": default_answer(body) if r.content is None else r.content}}],
                                   "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}
                        if not r.choices:
                            del payload["choices"]
                    else:
                        payload = {"error": {"message": f"scripted {r.status}", "type": "test", "code": r.status}}
                    data = json.dumps(payload).encode() if r.body is None else r.body
                    self.send_response(r.status)
                    self.send_header("Content-Type", r.content_type)
                    self.send_header("Content-Length", str(len(data)))
                    if r.status == 429:
                        self.send_header("Retry-After", r.retry_after)
                    self.end_headers()
                    if r.trickle_s:
                        for i in range(len(data)):
                            self.wfile.write(data[i : i + 1])
                            self.wfile.flush()
                            time.sleep(r.trickle_s)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass
                finally:
                    with server._lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
