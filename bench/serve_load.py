"""`tunejob serve` under load: API latency while a job trains and a chat generates, and what the
load costs training.

    python bench/serve_load.py --out bench/results/serve_load.json                  # 32 clients, 60 s
    python bench/serve_load.py --model /path/to/tiny --clients 2 --seconds 3 --max-seq-len 64   # smoke size

One run, one server (`--train-threads` / `--chat-threads` passed through):
  1. training alone: a job on the Sales Companion set trains for `--seconds` with no other
     traffic; its tokens/s is read from the run's metrics.jsonl (tokens_seen over elapsed_s between
     the window's first and last step records); then it is cancelled;
  2. under load: a second, identical job trains while one client keeps a streamed chat
     generating (`--stream-tokens` per answer, one after another) and `--clients` clients mix list
     files / jobs / models, retrieve a job / a file, list events, upload, and chat
     (`--chat-tokens`, non-streamed) for `--seconds`;
  3. reported: p50 / p99 latency and status counts per call kind (429 is the chat queue saying
     busy, not an error), chat tokens/s (every completion token the engine generated in the
     window), and training tokens/s under load against alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from report import publish
from serve_latency import DATA, KEY, MESSAGES, start_server  # the same server start, key and data as the latency bench
from tunejob.server.run import free_port


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def last_train_record(metrics: Path) -> dict | None:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("kind") == "train":
            return r
    return None


def start_job(client, file_id: str, max_seq_len: int, data_dir: Path) -> tuple[str, Path]:
    """A job long enough to outlast the window; returns (id, its metrics.jsonl) once step 1 is done."""
    job = client.fine_tuning.jobs.create(training_file=file_id, model="default", hyperparameters={"n_epochs": 50, "batch_size": 4},
                                         extra_body={"tunejob": {"hyperparameters": {"max_seq_len": max_seq_len},
                                                                 "checkpointing": {"eval_steps": 1000, "save_steps": 1000}}})
    metrics = data_dir / "jobs" / job.id / "run" / "metrics.jsonl"
    deadline = time.time() + 600
    while last_train_record(metrics) is None:
        if time.time() > deadline or client.fine_tuning.jobs.retrieve(job.id).status == "failed":
            raise SystemExit(f"job {job.id} never trained a step")
        time.sleep(0.2)
    return job.id, metrics


def training_rate(metrics: Path, during) -> float:
    """Training tokens/s over the window in which `during()` runs."""
    first = last_train_record(metrics)
    during()
    last = last_train_record(metrics)
    if last["step"] == first["step"]:
        return 0.0  # the window was shorter than a step: raise --seconds
    return round((last["tokens_seen"] - first["tokens_seen"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9), 1)


def stream_forever(port: int, max_tokens: int, until: float, tokens: list[int]) -> None:
    """One client keeping a streamed chat generating; counts content chunks (one per token, about)."""
    body = json.dumps({"model": "default", "messages": MESSAGES, "stream": True, "max_tokens": max_tokens, "temperature": 0})
    while time.time() < until:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            time.sleep(1)
            continue
        while (line := response.fp.readline()) and time.time() < until:
            if line.startswith(b"data: {") and b'"content": "' in line:
                tokens[0] += 1
        conn.close()


def mixed_client(client, ids: dict, chat_tokens: int, until: float, seed: int, calls: list, chat_tokens_done: list[int]) -> None:
    import openai

    rng = random.Random(seed)

    def chat():
        out = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=chat_tokens, temperature=0)
        chat_tokens_done[0] += out.usage.completion_tokens

    kinds = {"list_files": lambda: client.files.list(), "list_jobs": lambda: client.fine_tuning.jobs.list(),
             "list_models": lambda: client.models.list(), "retrieve_job": lambda: client.fine_tuning.jobs.retrieve(ids["job"]),
             "retrieve_file": lambda: client.files.retrieve(ids["file"]),
             "events": lambda: client.fine_tuning.jobs.list_events(ids["job"], limit=20),
             "upload": lambda: client.files.create(file=("small.jsonl", ids["small"]), purpose="fine-tune"), "chat": chat}
    while time.time() < until:
        kind = rng.choice(sorted(kinds))
        start = time.perf_counter()
        try:
            kinds[kind]()
            status = 200
        except openai.APIStatusError as exc:
            status = exc.status_code
        except openai.APIConnectionError:
            status = 599
        calls.append((kind, status, time.perf_counter() - start))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--train-threads", type=int, default=None, help="passed to tunejob serve (default: its budget)")
    ap.add_argument("--chat-threads", type=int, default=None, help="passed to tunejob serve (default: its budget)")
    ap.add_argument("--chat-tokens", type=int, default=16, help="max_tokens of the mixed clients' chats")
    ap.add_argument("--stream-tokens", type=int, default=256, help="max_tokens of each answer of the always-generating stream")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from openai import OpenAI

    from tunejob.train.models import default_model_path
    from tunejob.train.threads import SERVER_NICE, budget

    model = args.model or str(default_model_path())
    extra = [*(["--train-threads", str(args.train_threads)] if args.train_threads else []),
             *(["--chat-threads", str(args.chat_threads)] if args.chat_threads else [])]
    shares = budget(args.train_threads, args.chat_threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = free_port()
        server = start_server(tmp / "data", model, port, tmp / "server.log", extra)
        # The clients stand for other machines. On this one they must not outrank the server they
        # measure, whose HTTP threads yield to training at nice SERVER_NICE (train/threads.py):
        # 32 threads of SDK parsing at nice 0 would be timed as the server's latency.
        os.nice(max(0, SERVER_NICE - os.nice(0)))
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)
            f = client.files.create(file=open(DATA, "rb"), purpose="fine-tune")

            alone_job, metrics = start_job(client, f.id, args.max_seq_len, tmp / "data")
            alone = training_rate(metrics, during=lambda: time.sleep(args.seconds))
            client.fine_tuning.jobs.cancel(alone_job)
            while client.fine_tuning.jobs.retrieve(alone_job).status != "cancelled":
                time.sleep(0.5)

            loaded_job, metrics = start_job(client, f.id, args.max_seq_len, tmp / "data")
            ids = {"job": loaded_job, "file": f.id, "small": b"".join(DATA.read_bytes().splitlines(keepends=True)[:3])}
            calls: list = []
            stream_tokens, chat_tokens = [0], [0]

            def load() -> None:
                until = time.time() + args.seconds
                threads = [threading.Thread(target=stream_forever, args=(port, args.stream_tokens, until, stream_tokens), daemon=True)]
                threads += [threading.Thread(target=mixed_client, args=(OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600),
                                                                        ids, args.chat_tokens, until, n, calls, chat_tokens), daemon=True)
                            for n in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=args.seconds + 600)

            client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=1)  # loads the model: not in the window
            started = time.time()
            under_load = training_rate(metrics, during=load)
            window = time.time() - started
            client.fine_tuning.jobs.cancel(loaded_job)
        finally:
            server.terminate()
            server.wait(timeout=60)

    by_kind: dict[str, list] = defaultdict(list)
    for kind, status, seconds in calls:
        by_kind[kind].append((status, seconds))
    latency = {kind: {"n": len(xs), "p50_s": percentile([s for _, s in xs], 0.5), "p99_s": percentile([s for _, s in xs], 0.99),
                      "statuses": dict(Counter(str(st) for st, _ in xs))} for kind, xs in sorted(by_kind.items())}
    publish({
        "model": model, "clients": args.clients, "seconds": args.seconds, "cores": shares.cores,
        "train_threads": shares.train, "chat_threads_while_training": shares.chat,
        "latency": latency, "server_errors_5xx": sum(1 for _, st, _ in calls if st >= 500),
        "chat_tokens_per_s": round((stream_tokens[0] + chat_tokens[0]) / window, 1),
        "chat_tokens": {"stream": stream_tokens[0], "mixed_chats": chat_tokens[0]},
        "training_tokens_per_s": {"alone": alone, "under_load": under_load,
                                  "under_load_vs_alone": round(under_load / alone, 3) if alone else None},
    }, args.out)


if __name__ == "__main__":
    main()
