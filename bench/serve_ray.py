"""`tunejob serve --executor ray` against the local executor: jobs submitted, peak concurrency,
seconds from jobs.create to the first metrics event, jobs lost and duplicate runs.

    python bench/serve_ray.py --jobs 6 --out bench/results/serve_ray.json               # the figures (quiet machine)
    python bench/serve_ray.py --model /path/to/tiny --jobs 2 --examples 16 --nodes 1    # smoke size

One run:
  1. start a Ray cluster on this machine (tests/ray_nodes.py: a head node and `--nodes` worker
     nodes, `--cpus-per-node` CPUs each, on 127.0.0.2+) and `tunejob serve --executor ray`;
  2. upload one training file and create `--jobs` jobs at once (1 CPU each, so the cluster runs
     as many at a time as it has CPUs), polling every job until all end; peak concurrency is the
     most jobs seen `running` in one poll;
  3. the same with `tunejob serve` and its default local executor (one job at a time) for the
     time from jobs.create to the first metrics event;
  4. count jobs that did not succeed (lost) and Ray jobs beyond one per tunejob job (duplicates),
     and train steps reported twice.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from report import publish
from serve_latency import KEY, start_server
from tunejob.server.run import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ray_nodes import start_cluster  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def write_data(path: Path, n: int) -> Path:
    import json
    import random

    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(5)) + f" {i}"
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": q.upper()}]}) + "\n")
    return path


def run_jobs(url: str, data: Path, jobs: int, epochs: int) -> dict:
    """Create `jobs` jobs at once and follow them to the end."""
    from openai import OpenAI

    c = OpenAI(base_url=url, api_key=KEY, max_retries=2, timeout=600)
    f = c.files.create(file=open(data, "rb"), purpose="fine-tune")
    body = {"tunejob": {"resources": {"cpus": 1}, "hyperparameters": {"max_seq_len": 64}, "checkpointing": {"eval_steps": 5, "save_steps": 5}}}
    created, first_metric, ids = {}, {}, []
    for _ in range(jobs):
        t = time.perf_counter()
        ids.append(c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": epochs, "batch_size": 4},
                                             extra_body=body).id)
        created[ids[-1]] = t
    peak, statuses, deadline = 0, {}, time.time() + 3600
    while time.time() < deadline:
        statuses = {j: c.fine_tuning.jobs.retrieve(j).status for j in ids}
        peak = max(peak, sum(s == "running" for s in statuses.values()))
        for j in ids:
            if j not in first_metric and statuses[j] in ("running", "succeeded"):
                if any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(j, limit=100).data):
                    first_metric[j] = time.perf_counter() - created[j]
        if all(s in ("succeeded", "failed", "cancelled") for s in statuses.values()):
            break
        time.sleep(0.5)
    doubled = 0
    for j in ids:
        # training-loss events only: an eval step's event carries train_loss too
        steps = [e.data["step"] for e in c.fine_tuning.jobs.list_events(j, limit=100)
                 if e.type == "metrics" and "train_loss" in e.data and "valid_loss" not in e.data]
        doubled += len(steps) - len(set(steps))
    waits = sorted(first_metric.values())
    return {"jobs_submitted": jobs, "peak_concurrency": peak, "lost": sum(s != "succeeded" for s in statuses.values()),
            "steps_reported_twice": doubled, "ids": ids,
            "create_to_first_metrics_s": {"first_job": round(first_metric.get(ids[0], float("nan")), 2),
                                          "median": round(statistics.median(waits), 2) if waits else None,
                                          "max": round(waits[-1], 2) if waits else None}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--nodes", type=int, default=1, help="worker nodes beside the head")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from ray.job_submission import JobSubmissionClient

    from tunejob.train.models import default_model_path

    model = args.model or str(default_model_path())
    report = {"date": time.strftime("%Y-%m-%d"), "model": model, "nodes": 1 + args.nodes, "cpus_per_node": args.cpus_per_node}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_data(tmp / "train.jsonl", args.examples)
        cluster = start_cluster(args.cpus_per_node, {f"worker{i}": (args.cpus_per_node, {}) for i in range(args.nodes)})
        try:
            port = free_port()
            server = start_server(tmp / "ray-data", model, port, tmp / "ray-server.log", ["--executor", "ray", "--ray-address", cluster.address])
            try:
                ray = run_jobs(f"http://127.0.0.1:{port}/v1", data, args.jobs, args.epochs)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)
            ray_jobs = JobSubmissionClient(cluster.address).list_jobs()
            per_job = {j: sum((r.metadata or {}).get("tunejob_job") == j for r in ray_jobs) for j in ray.pop("ids")}
            ray["duplicate_runs"] = sum(n - 1 for n in per_job.values() if n > 1)
        finally:
            cluster.stop()
        port = free_port()
        server = start_server(tmp / "local-data", model, port, tmp / "local-server.log")
        try:
            local = run_jobs(f"http://127.0.0.1:{port}/v1", data, min(args.jobs, 2), args.epochs)
            local.pop("ids")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    report.update(ray=ray, local=local)
    publish(report, args.out)


if __name__ == "__main__":
    main()
