"""One job over two Ray nodes with NCCL: `tunejob run --ray-address` on a GPU machine (issue 34).

Needs 2 GPUs. It starts a local Ray cluster (tests/ray_nodes.py): a head with no CPUs and two
nodes that own one GPU each (CUDA_VISIBLE_DEVICES), so Ray Train's 2 workers form an NCCL group
across two Ray nodes. The job (the tiny model from config, 18 steps) runs once in one process on
GPU 0 and once as `processes: 1, nodes: 2` on Ray; the validation losses must agree within 1e-5
relative (bf16 is off: fp32 on both), and the two workers must sit on different nodes.

    python bench/ray_train_gpu.py --out $OUT       # ~2-3 min on a 2-GPU machine; writes ray_train_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def spec_text(model: Path, data: Path, out: Path, extra: str = "") -> str:
    return (f"model: {model}\ndata: {{train: {data}, val_fraction: 0.25}}\noutput_dir: {out}\n"
            "hyperparameters: {epochs: 3, batch_size: 4, learning_rate: 0.02, max_seq_len: 64, warmup: 0, mixed_precision: 'no'}\n"
            "lora: {r: 4, dropout: 0.0}\ncheckpointing: {eval_steps: 3, save_steps: 3, early_stopping_patience: null}\n" + extra)


def valid_losses(run: Path) -> list[float]:
    return [r["valid_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


def tunejob(*args: str, env: dict | None = None) -> dict:
    res = subprocess.run([sys.executable, "-m", "tunejob", "run", *args], capture_output=True, text=True, timeout=900,
                         env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise SystemExit(f"tunejob run {' '.join(args)} exited {res.returncode}:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args()
    import torch

    from conftest import write_chat_data
    from ray_nodes import start_cluster
    from tunejob.train.models import build_tiny_model

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs for 2 NCCL workers (NCCL refuses two ranks on one GPU); this machine has {torch.cuda.device_count()}")
    work = Path(tempfile.mkdtemp(prefix="raygpu"))
    model, data = build_tiny_model(work / "model"), write_chat_data(work / "d.jsonl", 32)
    (work / "one.yaml").write_text(spec_text(model, data, work / "one"))
    (work / "two.yaml").write_text(spec_text(model, data, work / "two", "distributed: {processes: 1, nodes: 2}\n"))
    one = tunejob(str(work / "one.yaml"), env={"CUDA_VISIBLE_DEVICES": "0"})
    cluster = start_cluster(head_cpus=0)
    try:
        for i in range(2):
            cluster.add_node(f"gpu{i}", 2, gpus=[i])
            cluster.wait_ready(2 + i)
        t0 = time.time()
        two = tunejob(str(work / "two.yaml"), "--ray-address", f"127.0.0.2:{cluster.gcs_port}")
        wall = time.time() - t0
    finally:
        cluster.stop()
    v1, v2 = valid_losses(work / "one"), valid_losses(work / "two")
    rel = max(abs(a - b) / abs(a) for a, b in zip(v1, v2))
    result = {"device_one": one["device"], "device_two": two["device"], "placement": two["placement"], "valid_losses_one": v1,
              "valid_losses_two": v2, "max_relative_diff": rel, "ray_wall_s": round(wall, 1),
              "ok": rel < 1e-5 and len(two["placement"]["node_ids"]) == 2 and two["device"].startswith("cuda")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_train_gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
