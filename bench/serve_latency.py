"""`tunejob serve` latency: chat completions through the server vs generate() on the same adapter
in-process, and the time from job creation to the first training step.

    python bench/serve_latency.py --requests 10 --out bench/results/serve_latency.json
    python bench/serve_latency.py --model /path/to/tiny --requests 2      # smoke size

One run:
  1. start `tunejob serve` (a child process) on 127.0.0.1 with the model as its default base;
  2. upload the Sales Companion set with the official openai SDK, create a job (batch 4, a
     checkpoint every 2 steps), and time jobs.create -> the first `metrics` event (step 1) and
     -> the first checkpoint; then cancel the job;
  3. chat with that checkpoint `--requests` times through the SDK (greedy, `--max-tokens`), the
     first request apart (it loads base + adapter: cold);
  4. load the same base + adapter in this process and call the server's own generation function
     (server/inference/completion.complete) with the same messages and settings: the direct baseline.
The difference between 3 and 4 is what HTTP, JSON and the server add per request.

Concurrent streams (`--streams 1,4,8`; replaces the steps above): for each N, N clients stream
`--stream-requests` greedy chats each at once (the official SDK, stream_options.include_usage) to
`tunejob serve` on the base model, after one warm-up request; figures per N: aggregate completion
tokens/s (all tokens / wall time), time to first token and whole-request latency (p50 / p99).
`--transformers-serve` runs the same load against `transformers serve MODEL` (transformers' own
OpenAI-compatible server; fp32 on CPU, as tunejob's default) and its `--continuous-batching`.
Each step's effect: `--serve-arg=--chat-batch=1` (one request at a time), `--fine-tuned` (an
adapter, merged from its 2nd request) with and without `--serve-arg=--chat-merge-mb=0`,
`--chat-dtype bfloat16`, `--serve-arg=--chat-compile`. `--llama-cpp f16,q8_0` adds a row per GGUF type for
`tunejob serve --engine llama.cpp` (the model converted once by the server, in the warm-up request;
llama-cpp-python should be built for the machine's CPU, see the README), beside llama.cpp itself in
this process on the same file and prompt (its own loop: no HTTP), and with `--llama-cpp-server`
llama-cpp-python's OpenAI server on that file (the same client and HTTP as tunejob serve):

    python bench/serve_latency.py --streams 1,4,8 --stream-requests 4 --max-tokens 128 --transformers-serve \
        --out bench/results/serve_streams.json
    python bench/serve_latency.py --streams 1,8 --stream-requests 4 --max-tokens 128 --llama-cpp f16,q8_0 --llama-cpp-server \
        --out bench/results/serve_streams_llama_cpp.json
    python bench/serve_latency.py --model /path/to/tiny --streams 1,2 --stream-requests 1 --max-tokens 4 --transformers-serve  # smoke
"""

from __future__ import annotations

import argparse
import os
import threading
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import publish, read_bandwidth
from tunejob.server.run import free_port, wait_until_up

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "src" / "tunejob" / "resources" / "sales_companion.jsonl"
KEY = "sk-bench-local-key-0001"  # the server refuses keys under 16 characters
MESSAGES = [{"role": "user", "content": "Prep me for the Globex call."}]


def start_server(data_dir: Path, model: str, port: int, log: Path, extra: list[str] | tuple[str, ...] = ()) -> subprocess.Popen:
    """`tunejob serve` on loopback with the bench key (serve_load.py starts it this way too)."""
    proc = subprocess.Popen([sys.executable, "-m", "tunejob", "serve", "--port", str(port), "--data-dir", str(data_dir),
                             "--api-key", KEY, "--default-model", model, *extra], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    except RuntimeError as exc:
        proc.kill()
        raise SystemExit(f"{exc}:\n{log.read_text()[-2000:]}") from None
    return proc


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"n": len(xs), "median_s": round(statistics.median(xs), 3), "p90_s": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 3),
            "min_s": round(xs[0], 3)}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def stream_load(base_url: str, api_key: str, model: str, streams: int, requests: int, max_tokens: int, extra: dict | None = None,
                messages: list[dict] = MESSAGES) -> dict:
    """`streams` clients at once, each streaming `requests` greedy chats of `messages` one after the
    other (`extra`: a server's own body fields, sent as extra_body)."""
    from openai import OpenAI

    ttft, latency, tokens, failures = [], [], [], []

    def client_loop() -> None:
        c = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=1800)
        for _ in range(requests):
            t, first, used, pieces = time.perf_counter(), None, None, 0
            try:
                for chunk in c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}, extra_body=extra):
                    if chunk.choices and chunk.choices[0].delta.content:
                        first, pieces = first or time.perf_counter(), pieces + 1
                    if chunk.usage:
                        used = chunk.usage.completion_tokens
            except Exception as exc:  # a server that refuses (429) or breaks: counted, not hidden
                failures.append(f"{exc.__class__.__name__}: {str(exc)[:200]}")
                continue
            end = time.perf_counter()
            ttft.append((first or end) - t)
            latency.append(end - t)
            tokens.append(used if used is not None else pieces)  # without usage, content chunks (~tokens)

    workers = [threading.Thread(target=client_loop) for _ in range(streams)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    out = {"streams": streams, "requests": len(latency), "failures": failures[:5], "completion_tokens": sum(tokens),
           "wall_s": round(wall, 2), "aggregate_tokens_per_s": round(sum(tokens) / wall, 1)}
    if latency:
        out.update(ttft_p50_s=percentile(ttft, 0.5), ttft_p99_s=percentile(ttft, 0.99),
                   latency_p50_s=percentile(latency, 0.5), latency_p99_s=percentile(latency, 0.99))
    return out


def streams_report(args, model: str) -> dict:
    """The concurrent-streams figures for tunejob serve and (with --transformers-serve) transformers serve."""
    counts = [int(n) for n in args.streams.split(",")]
    servers: dict[str, list[str] | None] = {"tunejob_serve": ["--engine", "local"]}  # torch (serve's default engine is auto)
    for kind in filter(None, args.llama_cpp.split(",")):  # the same server, chat's forward passes in llama.cpp
        servers[f"tunejob_serve_llama_cpp_{kind}"] = ["--engine", "llama.cpp", "--chat-gguf-type", kind]
    if args.transformers_serve:
        servers.update({"transformers_serve": [], "transformers_serve_continuous_batching": ["--continuous-batching"]})
    if args.llama_cpp_server:  # what a user picks instead to serve a GGUF: the same client, over HTTP too
        servers.update({f"llama_cpp_server_{kind}": [kind] for kind in filter(None, args.llama_cpp.split(","))})
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "model": model, "max_tokens": args.max_tokens,
              "requests_per_stream": args.stream_requests, "chat_dtype": args.chat_dtype, "serve_args": args.serve_arg,
              "fine_tuned": args.fine_tuned, "llama_cpp": _llama_cpp_build() if args.llama_cpp else None}
    for kind in filter(None, args.llama_cpp.split(",")):  # llama.cpp itself on the same file: the bar to reach
        report[f"llama_cpp_itself_{kind}"] = _llama_cpp_itself(model, kind, args.max_tokens, args.stream_requests)
    for name, flags in servers.items():
        llama_server = name.startswith("llama_cpp_server")
        with tempfile.TemporaryDirectory() as tmp:
            port, log = free_port(), Path(tmp) / "server.log"
            if name.startswith("tunejob_serve"):
                proc = start_server(Path(tmp) / "data", model, port, log,
                                    ["--chat-queue", str(max(counts)), "--chat-dtype", args.chat_dtype, *(flags or []), *args.serve_arg])
                url, key, name_in_api = f"http://127.0.0.1:{port}/v1", KEY, "default"
                if args.fine_tuned:
                    name_in_api = _fine_tuned(url)
            else:
                start = _start_llama_cpp_server if llama_server else _start_transformers_serve
                proc = start(model, port, log, flags, args.chat_dtype)
                if isinstance(proc, str):
                    report[name] = {"error": proc}
                    continue
                url, key, name_in_api = f"http://127.0.0.1:{port}/v1", "unused", "default" if llama_server else model
            try:
                # llama-cpp-python's server applies repeat_penalty 1.1 by default, even at temperature 0: off, so
                # that it decodes the same greedy answers (the others apply none unless asked)
                extra = {"repeat_penalty": 1.0} if llama_server else None
                warm = stream_load(url, key, name_in_api, 1, 1, 2, extra)
                report[name] = ([stream_load(url, key, name_in_api, n, args.stream_requests, args.max_tokens, extra) for n in counts]
                                if warm["requests"] else {"error": warm["failures"]})
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return report


def _llama_cpp_build() -> dict:
    """Which llama-cpp-python the llama.cpp rows ran: the instruction sets it was built with (a build
    without AVX2, or at -O1, is several times slower), so the report says which it was."""
    import llama_cpp

    return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def llama_cpp_completions(llm, prompt: str, requests: int, max_tokens: int) -> tuple[int, float]:
    """`requests` greedy completions of `prompt`, one after the other, in llama-cpp-python's own
    `Llama` (its sampler, its loop, its reuse of the prefix it evaluated last): (completion tokens,
    seconds). serve_vs_llama_cpp.py times llama.cpp's side with it too."""
    t, tokens = time.perf_counter(), 0
    for _ in range(requests):
        tokens += llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - t


def _llama_cpp_itself(model: str, kind: str, max_tokens: int, requests: int = 4) -> dict:
    """One greedy stream in llama-cpp-python's own Llama, `requests` completions one after the
    other as one stream of the load sends them (its sampler, its loop; the GGUF file the
    server converts, the prompt the server renders), on all cores, beside the weight-read bound:
    the tensor bytes each token reads (every weight, the tied or untied head included) over the
    read bandwidth of a 1 GiB pass measured here (torch sum on every core, best of 5)."""
    from llama_cpp import Llama

    from tunejob.server.inference.gguf_files import GgufFiles
    from tunejob.train.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = GgufFiles(Path(tmp), kind, log=lambda m: None).base(model)
        size = path.stat().st_size
        prompt = load_tokenizer(model).apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        llm = Llama(str(path), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
        llama_cpp_completions(llm, prompt, 1, 8)  # warm-up
        tokens, wall = llama_cpp_completions(llm, prompt, requests, max_tokens)
    read = read_bandwidth()
    return {"tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1), "gguf_bytes": size,
            "read_gb_per_s": round(read / 1e9, 2), "weight_read_bound_tokens_per_s": round(read / size, 1)}


def _fine_tuned(url: str) -> str:
    """A fine-tuned model to chat with: a 2-step job on the Sales Companion set (its adapter is what counts)."""
    from openai import OpenAI

    c = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=600)
    f = c.files.create(file=open(DATA, "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"batch_size": 4},
                                    extra_body={"tunejob": {"hyperparameters": {"max_steps": 2, "max_seq_len": 256}}})
    while (job := c.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
    if job.status != "succeeded":
        raise SystemExit(f"the job for --fine-tuned ended {job.status}: {job.error}")
    return job.fine_tuned_model


def _start_transformers_serve(model: str, port: int, log: Path, flags: list[str], dtype: str):
    """`transformers serve MODEL` on loopback, or why it did not start (the report says so)."""
    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", dtype, *flags]
    return _start(cmd, f"http://127.0.0.1:{port}/health", log)


def _start(cmd: list[str], ready_url: str, log: Path):
    """A server process once `ready_url` answers, or why it did not start (the report says so)."""
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_until_up(ready_url, proc, timeout=300)
    except RuntimeError as exc:
        proc.kill()
        return f"{exc}: {log.read_text()[-500:]}"
    return proc


def _start_llama_cpp_server(model: str, port: int, log: Path, flags: list[str], dtype: str):
    """llama-cpp-python's OpenAI server on the GGUF that tunejob serve converts (the `kind` in
    flags), all cores, the template in the GGUF; or why it did not start. It answers one request at
    a time (its own lock): N streams queue there (--interrupt_requests false: by default each new
    request would cut the one generating short), they batch in tunejob serve."""
    from tunejob.server.inference.gguf_files import GgufFiles

    path = GgufFiles(log.parent / "gguf", flags[0], log=lambda m: None).base(model)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", "default", "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "4096", "--n_threads", str(os.cpu_count()), "--n_threads_batch", str(os.cpu_count()),
           "--interrupt_requests", "false"]
    return _start(cmd, f"http://127.0.0.1:{port}/v1/models", log)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--streams", default="", help="concurrent streams to measure, e.g. 1,4,8 (replaces the job and latency steps)")
    ap.add_argument("--stream-requests", type=int, default=4, help="requests each stream sends, one after the other")
    ap.add_argument("--transformers-serve", action="store_true", help="the same load against `transformers serve` (+ continuous batching)")
    ap.add_argument("--llama-cpp", default="", help="GGUF types to run `tunejob serve --engine llama.cpp` with, a row each, e.g. f16,q8_0")
    ap.add_argument("--llama-cpp-server", action="store_true", help="with --llama-cpp: a row for llama-cpp-python's own OpenAI server "
                    "(`python -m llama_cpp.server`, needs its [server] extras) on each GGUF type")
    ap.add_argument("--fine-tuned", action="store_true", help="streams chat with a fine-tuned model (a 2-step job) instead of the base")
    ap.add_argument("--serve-arg", action="append", default=[], help="an extra `tunejob serve` option, e.g. --serve-arg=--chat-batch=1 "
                    "(one at a time), --serve-arg=--chat-merge-mb=0 (unmerged), --serve-arg=--chat-compile")
    ap.add_argument("--chat-dtype", default="float32", choices=["float32", "bfloat16"], help="weights both servers chat in")
    args = ap.parse_args()

    from tunejob.train.models import default_model_path

    model = args.model or str(default_model_path())
    publish(streams_report(args, model) if args.streams else latency_report(args, model), args.out)


def latency_report(args, model: str) -> dict:
    """Steps 1-4 of the docstring: job start times, served chat latency, the direct baseline."""
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = free_port()
        # the direct baseline below is torch in fp32: the server chats on the same engine (serve's default, auto,
        # picks llama.cpp's f16 on a CPU, whose greedy answer a random tiny model may flip) in --chat-dtype
        server = start_server(tmp / "data", model, port, tmp / "server.log",
                              ["--engine", "local", "--chat-dtype", args.chat_dtype])
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)
            f = client.files.create(file=open(DATA, "rb"), purpose="fine-tune")
            t_create = time.perf_counter()
            job = client.fine_tuning.jobs.create(
                training_file=f.id, model="default", hyperparameters={"n_epochs": 1, "batch_size": 4},
                extra_body={"tunejob": {"hyperparameters": {"max_seq_len": args.max_seq_len},
                                        "checkpointing": {"eval_steps": 2, "save_steps": 2}}})
            first_step = first_ckpt = None
            deadline = time.time() + 1800
            while (first_step is None or first_ckpt is None) and time.time() < deadline:
                if first_step is None:
                    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
                    if any(e.type == "metrics" and (e.data or {}).get("step") for e in events):
                        first_step = time.perf_counter() - t_create
                if first_ckpt is None and client.fine_tuning.jobs.checkpoints.list(job.id).data:
                    first_ckpt = time.perf_counter() - t_create
                if client.fine_tuning.jobs.retrieve(job.id).status in ("failed", "cancelled"):
                    raise SystemExit(f"job ended early:\n{(tmp / 'server.log').read_text()[-2000:]}")
                time.sleep(0.1)
            ckpt = client.fine_tuning.jobs.checkpoints.list(job.id).data[-1]
            client.fine_tuning.jobs.cancel(job.id)
            while client.fine_tuning.jobs.retrieve(job.id).status not in ("cancelled", "succeeded", "failed"):
                time.sleep(0.2)

            def ask() -> tuple[float, str]:
                t = time.perf_counter()
                r = client.chat.completions.create(model=ckpt.fine_tuned_model_checkpoint, messages=MESSAGES,
                                                   max_tokens=args.max_tokens, temperature=0)
                return time.perf_counter() - t, r.choices[0].message.content

            cold, served_text = ask()
            served = [ask()[0] for _ in range(args.requests)]
            adapter = tmp / "data" / "jobs" / job.id / "run" / "checkpoints" / f"step-{ckpt.step_number:06d}"
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

        # the direct baseline: the same base + adapter, the server's generation function, no HTTP
        from tunejob.evaluate.chat import ModelCache
        from tunejob.server.inference import completion

        t = time.perf_counter()
        m, tok = ModelCache().get(model, adapter)
        load_s = time.perf_counter() - t
        direct, direct_text = [], None
        for _ in range(args.requests + 1):
            t = time.perf_counter()
            out = completion.complete(m, tok, MESSAGES, "direct", max_tokens=args.max_tokens, temperature=0)
            direct.append(time.perf_counter() - t)
            direct_text = out["choices"][0]["message"]["content"]
        direct = direct[1:]  # the first call warms up like the server's cold one

    s, d = summary(served), summary(direct)
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "model": model, "max_tokens": args.max_tokens,
        "time_to_first_step_s": round(first_step, 2), "time_to_first_checkpoint_s": round(first_ckpt, 2),
        "served_cold_first_request_s": round(cold, 3), "served": s, "direct_generate": d, "direct_model_load_s": round(load_s, 2),
        "overhead_median_s": round(s["median_s"] - d["median_s"], 3), "same_answer": served_text == direct_text,
    }
    return report


if __name__ == "__main__":
    main()
