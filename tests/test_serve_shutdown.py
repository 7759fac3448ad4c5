"""SIGTERM stops `tunejob serve` promptly with chats in flight (issue 35): each client gets an
error in OpenAI's shape (a 503 for a plain request, an error event on an open stream) instead of
the server waiting for generations nobody will read, and the process exits."""

from __future__ import annotations

import signal
import threading
import time

import openai

from test_serve import Server, client


def test_sigterm_answers_generations_in_flight_and_exits(tmp_path, long_context_model):
    server = Server(tmp_path / "data", long_context_model, ("--chat-dtype", "float32")).start()
    c = client(server)
    ask = {"model": "default", "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 4000, "temperature": 0}
    outcome: dict[str, object] = {}
    streamed = threading.Event()

    def plain():
        try:
            outcome["plain"] = c.chat.completions.create(**ask)
        except openai.APIStatusError as exc:
            outcome["plain"], outcome["plain_at"] = exc, time.monotonic()

    def stream():
        try:
            for chunk in c.chat.completions.create(**ask, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    streamed.set()
            outcome["stream"] = "finished"
        except openai.APIError as exc:
            outcome["stream"], outcome["stream_at"] = exc, time.monotonic()

    threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
    try:
        for t in threads:
            t.start()
        assert streamed.wait(60), "the stream never started"
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        code = server.proc.wait(timeout=60)
    finally:
        server.stop()
    plain_error, stream_error = outcome.get("plain"), outcome.get("stream")
    assert isinstance(plain_error, openai.APIStatusError) and plain_error.status_code == 503, plain_error
    assert plain_error.body["code"] == "server_shutting_down"
    assert isinstance(stream_error, openai.APIError) and "shutting down" in stream_error.message, stream_error
    assert code in (0, -signal.SIGTERM)
    # 4,000 tokens take the tiny model far longer than this; the bound is generous for a busy CI machine
    assert max(outcome["plain_at"], outcome["stream_at"]) - sent < 10
    print(f"errors {outcome['plain_at'] - sent:.2f} s / {outcome['stream_at'] - sent:.2f} s after SIGTERM")
