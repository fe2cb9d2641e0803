"""A local OpenAI-compatible chat-completions server on 127.0.0.1 for the auto-interp tests.

It answers like a (very simple) model: a description for describe prompts, and for validation
prompts 1 for every sample whose prompt names a spatial relation. ``script`` can replace the
next answers with failures: ``(status, content, delay_s)``; content None = the default answer.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPATIAL = re.compile(r"\b(left|right|above|below)\b")


def default_answer(body: dict) -> str:
    system = body["messages"][0]["content"]
    parts = body["messages"][1]["content"]
    if "Produce *one*" in system:
        return json.dumps({"description": "questions about where objects are relative to each other"})
    samples = [p["text"] for p in parts if p["type"] == "text" and p["text"].startswith("Sample ")]
    return json.dumps({"classifications": [int(bool(SPATIAL.search(s))) for s in samples]})


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
                    status, content, delay = server.script.pop(0) if server.script else (200, None, 0.0)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(delay)
                    if status == 200:
                        payload = {"id": "cmpl-test", "object": "chat.completion", "created": 0,
                                   "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                       "role": "assistant",
                                       "content": default_answer(body) if content is None else content}}],
                                   "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}
                    else:
                        payload = {"error": {"message": f"scripted {status}", "type": "test", "code": status}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
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
