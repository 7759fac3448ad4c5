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
     (server/inference.complete) with the same messages and settings: the direct baseline.
The difference between 3 and 4 is what HTTP, JSON and the server add per request.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import publish
from tunejob.server.run import free_port, wait_until_up

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "src" / "tunejob" / "resources" / "sales_companion.jsonl"
KEY = "sk-bench-local"
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from openai import OpenAI

    from tunejob.train.models import default_model_path

    model = args.model or str(default_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = free_port()
        server = start_server(tmp / "data", model, port, tmp / "server.log")
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
        from tunejob.server import inference

        t = time.perf_counter()
        m, tok = inference.ModelCache().get(model, adapter)
        load_s = time.perf_counter() - t
        direct, direct_text = [], None
        for _ in range(args.requests + 1):
            t = time.perf_counter()
            out = inference.complete(m, tok, MESSAGES, "direct", max_tokens=args.max_tokens, temperature=0)
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
    publish(report, args.out)


if __name__ == "__main__":
    main()
