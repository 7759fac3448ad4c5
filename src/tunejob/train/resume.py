"""The training state a checkpoint holds (adapter, optimizer, scheduler, RNG of every rank, the
loop's counters) and getting it back; and telling a finished run from one to continue.

A resumed run repeats the uninterrupted one step for step: the data order is a pure function of
(seed, epoch) (batches.batch_order), and everything else that changes between steps is saved here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tunejob.train import checkpoint as ckpt
from tunejob.train import distributed

FINISHED = ("completed", "early_stopping", "nan_loss")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj, path: Path) -> None:
    # Given a path, torch.save reports a full disk as a bare RuntimeError ("unexpected pos 6976 vs
    # 6868"); given a Python file, the ENOSPC OSError stays attached, so the save can say "disk full".
    with open(path, "wb") as f:
        torch.save(obj, f)


def write_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, config_yaml: str, world: distributed.World | None = None) -> Path | None:
    """Rank 0 writes (the others' RNG states are gathered into rng.pt); every rank waits for the save."""
    world = world or distributed.World()
    rng = distributed.gather_objects(world, _rng_state())

    def contents(tmp: Path) -> None:
        model.save_pretrained(tmp)
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save(rng[0] if len(rng) == 1 else {"ranks": rng}, tmp / "rng.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        ckpt.write_json_atomic(tmp / "state.json", state)  # last: marks the contents complete

    path = ckpt.save_checkpoint(run_dir, state["step"], contents) if world.is_main else None
    distributed.barrier(world)
    return path


def restore_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    if "ranks" in rng:  # written by several processes: this rank's own (or rank 0's, if there are now more ranks)
        rng = rng["ranks"][rank] if rank < len(rng["ranks"]) else rng["ranks"][0]
    _set_rng_state(rng)
    return ckpt.read_state(path)


def started_precision(run_dir: Path) -> str | None:
    """The precision the run started in ("no" or "bf16", from its first start record): a resumed
    run keeps it. `auto` is measured per thread count, which differs between a serve child, the CLI
    and a Ray node, so resolving it again could switch a run's precision half-way (issue 31, finding 11)."""
    from tunejob.monitor.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    return next((r.get("mixed_precision") for r in read_metrics(path) if r.get("kind") == "start"), None)


def changed_keys(old_yaml: str, new_yaml: str) -> list[str]:
    import yaml

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(yaml.safe_load(old_yaml) or {}), flat(yaml.safe_load(new_yaml) or {})
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def finished_summary(run_dir: Path, config_yaml: str) -> dict | None:
    """The summary of a run that already ended (completed, early-stopped or stopped on NaN) with
    this very spec, else None. Running it again would only redo or extend it by accident: a re-run
    once rewrote summary.json with the peak memory of a process that trained nothing."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        previous = (run_dir / "config.yaml").read_text()
    except (OSError, ValueError):
        return None
    if summary.get("stop_reason") not in FINISHED or changed_keys(previous, config_yaml):
        return None
    return summary


def finished_message(run_dir: Path, summary: dict) -> str:
    reason = {"completed": "completed all its steps", "early_stopping": "stopped early",
              "nan_loss": "stopped on a NaN loss"}[summary["stop_reason"]]
    best = f"; best step {summary['best_step']} (valid loss {summary['best_valid_loss']:.4f})" if summary.get("best_step") else ""
    return (f"{run_dir}: this run {reason} at step {summary.get('steps')}{best}; nothing to do. To train on, change "
            f"the spec on purpose (e.g. --set hyperparameters.epochs=N, or checkpointing.early_stopping_patience), "
            f"or pick another output_dir")
