"""tunejob serve's chat engine under load, over real HTTP on 127.0.0.1: the event loop never waits
for a model, the chat queue is bounded (429 + Retry-After), a client that leaves stops its
generation, and a model fine-tuned on function calls answers with OpenAI tool calls."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time

import openai
import pytest

from conftest import write_chat_data
from test_serve import KEY_A, Server, client, wait_status

HEADERS = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}


def _post_chat(port: int, body: dict, timeout: float = 120) -> http.client.HTTPConnection:
    """Send a chat request without reading the answer (the caller reads it, or hangs up)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), HEADERS)
    return conn


class _Stream(threading.Thread):
    """A long streamed generation; records when each chunk arrived until `hang_up()`."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.conn = _post_chat(port, {"model": "default", "messages": [{"role": "user", "content": "alpha"}], "stream": True,
                                      "max_tokens": 4096, "temperature": 0})
        self.chunk_times: list[float] = []
        self.ended = threading.Event()
        self.done = False  # the answer ended by itself: [DONE] came

    def run(self) -> None:
        try:
            response = self.conn.getresponse()
            while line := response.fp.readline():
                if line.startswith(b"data: "):
                    self.chunk_times.append(time.time())
                    if line.startswith(b"data: [DONE]"):
                        self.done = True
                        break
        except (OSError, AttributeError):  # hung up on purpose (a closed response's fp is None)
            pass
        self.ended.set()

    def hang_up(self) -> None:
        self.conn.sock.shutdown(2)  # a client that goes away mid-stream
        self.conn.close()


def _mixed_calls(c: openai.OpenAI, file_id: str, job_id: str, upload, until: float, seed: int, calls: list) -> None:
    rng = random.Random(seed)
    kinds = {"list_files": lambda: c.files.list(), "list_jobs": lambda: c.fine_tuning.jobs.list(), "list_models": lambda: c.models.list(),
             "retrieve_job": lambda: c.fine_tuning.jobs.retrieve(job_id), "retrieve_file": lambda: c.files.retrieve(file_id),
             "events": lambda: c.fine_tuning.jobs.list_events(job_id, limit=20), "upload": upload}
    while time.time() < until:
        kind = rng.choice(sorted(kinds))
        start = time.time()
        try:
            kinds[kind]()
            status = 200
        except openai.APIStatusError as exc:
            status = exc.status_code
        calls.append((kind, status, start, time.time()))


def test_the_api_answers_while_a_job_trains_and_a_chat_generates(tmp_path, long_context_model):
    _api_under_load(tmp_path, long_context_model)


def test_under_the_llama_cpp_engine_too(tmp_path, long_context_model):
    """The same load with chat's forward passes in llama.cpp (its threads started by the niced chat
    thread, so they yield to the training child as torch's do). Its KV pool (8,192 cells here) holds
    one 4,096-token stream: the second waits in the queue, still counted by the 429."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the export extra: make setup / pip install -e .[export]")
    _api_under_load(tmp_path, long_context_model, ("--engine", "llama.cpp"))


def _api_under_load(tmp_path, model, engine: tuple[str, ...] = ()) -> None:
    server = Server(tmp_path / "data", model, ("--chat-queue", "2", *engine)).start()
    try:
        c = client(server)
        train = write_chat_data(tmp_path / "t.jsonl", 200)
        f = c.files.create(file=open(train, "rb"), purpose="fine-tune")
        long_run = {"tunejob": {"checkpointing": {"eval_steps": 50, "save_steps": 50}, "hyperparameters": {"max_seq_len": 64}}}
        # 50 epochs (2,500 steps of the tiny model): still training at the end whatever the load; the
        # server's stop ends it. 6 epochs finished before the chat did when other work loaded the cores.
        job = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 50, "batch_size": 4}, extra_body=long_run)
        wait_status(c, job.id, ("running",))

        stream = _Stream(server.port)
        stream.start()
        deadline = time.time() + 60
        while len(stream.chunk_times) < 3 and time.time() < deadline:  # the model is loaded and generating
            time.sleep(0.05)
        assert len(stream.chunk_times) >= 3 and not stream.ended.is_set()
        generating_since = stream.chunk_times[-1]

        calls: list = []
        upload = lambda: c.files.create(file=("small.jsonl", write_chat_data(tmp_path / "small.jsonl", 3).read_bytes()), purpose="fine-tune")  # noqa: E731
        until = time.time() + 8
        workers = [threading.Thread(target=_mixed_calls, args=(client(server), f.id, job.id, upload, until, n, calls)) for n in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)

        # The queue holds 2: the stream and a second long one (they generate together, batch.py); a third gets 429 at once.
        second = _Stream(server.port)
        second.start()
        deadline = time.time() + 60
        while not second.chunk_times and time.time() < deadline:
            time.sleep(0.05)
        refused = _post_chat(server.port, {"model": "default", "messages": [{"role": "user", "content": "gamma"}], "max_tokens": 2}).getresponse()
        body = json.loads(refused.read())
        assert refused.status == 429 and int(refused.getheader("Retry-After")) >= 1
        assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests" and set(body["error"]) == {"message", "type", "param", "code"}

        assert not stream.ended.is_set(), "the long generation ended before the load did; raise its max_tokens"
        last_chunk = stream.chunk_times[-1]
        stream.hang_up()
        # The second row decodes beside the first, left-padded, so its greedy path is not the first's: the
        # random model may pick its EOS and finish by itself (an answer, not a hang-up: one log line less).
        second_hung_up, second_ended = not second.done, second.ended.is_set()
        second.hang_up()
        deadline = time.time() + 30
        while True:  # the queue is free again once the streams' generations stopped (within a token of the hang-up)
            answer = _post_chat(server.port, {"model": "default", "messages": [{"role": "user", "content": "beta"}], "max_tokens": 2}).getresponse()
            if answer.status != 429 or time.time() > deadline:
                break
            answer.read()
            time.sleep(0.2)
        assert answer.status == 200 and json.loads(answer.read())["choices"][0]["finish_reason"] in ("stop", "length")

        assert calls and all(status < 500 for _, status, _, _ in calls), [x for x in calls if x[1] >= 500]
        during = [x for x in calls if x[2] >= generating_since and x[3] <= last_chunk and x[0] != "upload"]
        assert len(during) >= 3, f"GETs answered while the chat generated: {len(during)} of {len(calls)}"
        assert c.fine_tuning.jobs.retrieve(job.id).status == "running"
        deadline = time.time() + 120  # chat runs at nice 15 below the training child: slow to reach its next token on busy cores
        # the second may still be queued when its client leaves (the chat thread, at nice 15 under a training
        # child, takes the queue between steps): then it never starts, and the log says that instead
        hung_up = 1 + second_hung_up
        while server.log.read_text().count("chat: the client went away") < hung_up and time.time() < deadline:
            time.sleep(0.2)
        gone = [line for line in server.log.read_text().splitlines() if "chat: the client went away" in line]
        first = [int(line.split("after ")[1].split()[0]) for line in gone if "generation stopped after" in line]
        assert second.done or not second_ended, "the second stream ended without [DONE] before its hang-up (an error?)"
        assert len(gone) == hung_up and first and min(first) < 4096, (gone, server.log.read_text()[-3000:])
    finally:
        server.stop()


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# Two cities, each one token after a quote in SmolLM2's tokenizer: measured on the random 2x64 model
# (36 examples, 40 steps, LoRA on all linear layers at lr 0.01), six cities left the city's token at
# a loss of 11.5 (the model never learned to put a city there, and wrote noise after it); two
# cities bring it to 0.79 (log 2: either city), and every other token of the call below 0.3.
CITIES = ["Paris", "London"]


def _weather_calls(path, n: int):
    with open(path, "w") as f:
        for i in range(n):
            city = CITIES[i % len(CITIES)]
            call = {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Weather in {city}?"}, {"role": "assistant", "tool_calls": [call]}],
                                "tools": [WEATHER]}) + "\n")
    return path


def test_a_model_fine_tuned_on_function_calls_answers_with_a_tool_call(tmp_path, tiny_model):
    server = Server(tmp_path / "data", tiny_model).start()
    try:
        c = client(server)
        f = c.files.create(file=open(_weather_calls(tmp_path / "calls.jsonl", 36), "rb"), purpose="fine-tune")
        # LoRA on attention only stalled near loss 2 after 40 steps at lr 0.02; all linear layers learn the call.
        options = {"lora": {"r": 16, "dropout": 0, "target_modules": "all-linear"}, "hyperparameters": {"max_seq_len": 256, "warmup": 0},
                   "checkpointing": {"eval_steps": 100, "save_steps": 100}}
        job = c.fine_tuning.jobs.create(training_file=f.id, model="default", extra_body={"tunejob": options},
                                        hyperparameters={"n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 50})
        job = wait_status(c, job.id, ("succeeded",))
        ask = [{"role": "user", "content": "Weather in Texas?"}]  # a city it never saw
        answer = c.chat.completions.create(model=job.fine_tuned_model, messages=ask, tools=[WEATHER], temperature=0, max_tokens=40)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        # The content is not asserted: the tiny model cannot end its answer (its <|im_end|> is the pad
        # token, whose embedding row Llama's init zeroes, and the head is tied), so text follows the call.
        assert len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert set(json.loads(call.function.arguments)) == {"city"}

        pieces = list(c.chat.completions.create(model=job.fine_tuned_model, messages=ask, tools=[WEATHER], temperature=0, max_tokens=40,
                                                stream=True, stream_options={"include_usage": True}))
        deltas = [d for p in pieces if p.choices for d in p.choices[0].delta.tool_calls or []]
        assert [d.function.name for d in deltas] == ["get_weather"] and json.loads(deltas[0].function.arguments) == json.loads(call.function.arguments)
        assert [p.choices[0].finish_reason for p in pieces if p.choices][-1] == "tool_calls"
        assert pieces[-1].choices == [] and pieces[-1].usage.completion_tokens == answer.usage.completion_tokens

        # The call answered: a tool turn renders (as training rendered it) and tool_choice "none" parses no call.
        follow = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        plain = c.chat.completions.create(model=job.fine_tuned_model, messages=follow, tools=[WEATHER], tool_choice="none", max_tokens=5)
        assert plain.choices[0].finish_reason in ("stop", "length") and not plain.choices[0].message.tool_calls
    finally:
        server.stop()
