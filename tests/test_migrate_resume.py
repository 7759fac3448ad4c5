"""A killed `tunejob migrate record` loses nothing and pays for nothing twice: the real CLI, run
as a subprocess against the fake OpenAI account (tests/openai_account.py, spec-checked) served
over HTTP on 127.0.0.1, SIGKILLed twice halfway, then run to the end."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2 as httpx

from openai_account import Account

PROMPTS, CONCURRENCY, MODEL = 40, 3, "ft:gpt-4o-mini-2024-07-18:acme::gone-soon"


def serve(account: Account, delay: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _any(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path.endswith("/chat/completions"):
                time.sleep(delay)  # a model's time to answer: kills land with requests in flight
            reply = account.handle(httpx.Request(self.command, f"http://x{self.path}", headers=dict(self.headers), content=body))
            self.send_response(reply.status_code)
            for key, value in reply.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding"):
                    self.send_header(key, value)
            self.send_header("content-length", str(len(reply.content)))
            self.end_headers()
            try:
                self.wfile.write(reply.content)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client was SIGKILLed while this answer was in flight: the point of the test

        do_GET = do_POST = _any

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_record_killed_twice_resumes_with_every_prompt_once(tmp_path):
    account = Account()
    server = serve(account, delay=0.15)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"}]}) + "\n" for i in range(PROMPTS)))
    out, golden = tmp_path / "m", tmp_path / "m" / "golden.jsonl"
    env = dict(os.environ, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=f"http://127.0.0.1:{server.server_address[1]}/v1")
    cmd = [sys.executable, "-m", "tunejob", "migrate", "record", MODEL, "--out", str(out), "--prompts", str(prompts),
           "--concurrency", str(CONCURRENCY)]
    try:
        for stop_at in (8, 22):  # SIGKILL once this many answers are on disk
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 120
            while time.time() < deadline and (not golden.exists() or len(golden.read_text().splitlines()) < stop_at):
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert len(golden.read_text().splitlines()) < PROMPTS, "the run finished before it was killed"
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
    assert account.problems == []
    lines = [json.loads(line) for line in golden.read_text().splitlines()]
    asked = collections.Counter(c["messages"][-1]["content"] for c in account.chats)
    assert sorted(e["messages"][-1]["content"] for e in lines) == sorted(f"question {i}?" for i in range(PROMPTS))  # each exactly once
    assert all(e["answer"]["content"] == f"answer to {e['messages'][-1]['content']}" for e in lines)
    # Only a request in flight at a kill (its answer never reached the disk) is asked again.
    again = sum(n - 1 for n in asked.values())
    assert set(asked) == {f"question {i}?" for i in range(PROMPTS)} and again <= 2 * CONCURRENCY, asked
    summary = json.loads((out / "migration.json").read_text())
    assert summary["golden"]["answers"] == PROMPTS and summary["last_record"]["already"] >= 22
    print(json.dumps({"requests": len(account.chats), "asked_again": again, "last_run": summary["last_record"]}))
