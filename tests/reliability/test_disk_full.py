"""Disk full while saving a checkpoint (issue 10, part 3).

The run's output dir is a 140 KiB tmpfs. One checkpoint of the tiny model takes 88 KiB in 4 KiB
tmpfs pages (optimizer.pt 36, adapter 16, rng.pt 12, README 8, five small files 4 each), the rest
of the run dir ~20 KiB: step-000002 fits, step-000004 runs out of space halfway through.

Mounting needs root (CI containers run as root; so does this machine). Where mount is refused the
test says so and falls back to RLIMIT_FSIZE in the child (SIGXFSZ ignored, so a write past the
limit fails with EFBIG instead of killing the process): the limit is per file, not per disk, so
that variant writes step-000002 in a first run without the limit and lets the resumed run fail on
step-000004's 36 KiB optimizer.pt.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_chat_data
from tunejob.train import checkpoint as ckpt

TMPFS_KB = 140
FSIZE_LIMIT = 24 * 1024  # above the adapter (15 KiB), below optimizer.pt (36 KiB)


def _mount_tmpfs(where: Path, size_kb: int) -> str | None:
    """None when mounted, else why not."""
    if os.environ.get("TUNEJOB_TEST_NO_MOUNT"):  # to exercise the fallback on a machine that can mount
        return "TUNEJOB_TEST_NO_MOUNT is set"
    if shutil.which("mount") is None:
        return "no mount command"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip() or f"mount exited {res.returncode}")


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def _run(spec: Path, *extra: str, limit: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunejob", "run", str(spec), *extra], capture_output=True, text=True,
                          timeout=600, preexec_fn=_limit_file_size if limit else None)


def _assert_clear_disk_error(res: subprocess.CompletedProcess, ckdir: Path, reason: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])  # TunejobError's exit code, as for any bad run
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    msg = errors[0]  # one line: one paragraph in a terminal
    for part in (reason, str(ckdir), "step-000004", "step-000002", "output_dir", "resumes from it"):
        assert part in msg, (part, msg)
    return msg


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 20)  # 16 train / batch 4 = 4 steps; checkpoints at 2 and 4
    disk = tmp_path / "disk"
    disk.mkdir()
    why_not = _mount_tmpfs(disk, TMPFS_KB)
    out = disk / "run"
    ckdir = out / "checkpoints"
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: {tiny_model}\ndata: {{train: {data}, val_fraction: 0.2}}\noutput_dir: {out}\n"
                    "hyperparameters: {epochs: 1, batch_size: 4, max_seq_len: 64}\nlora: {r: 8}\n"
                    "checkpointing: {eval_steps: 2, save_steps: 2}\n")
    try:
        if why_not is None:
            failed = _run(spec)
            reason = "No space left on device"
        else:
            print(f"\n[disk-full] cannot mount a tmpfs ({why_not}); using RLIMIT_FSIZE={FSIZE_LIMIT} in the child instead")
            first = _run(spec, "--set", "hyperparameters.max_steps=2")
            assert first.returncode == 0, first.stderr[-3000:]
            failed = _run(spec, limit=True)
            reason = "File too large"
        msg = _assert_clear_disk_error(failed, ckdir, reason)
        print(f"\n[disk-full] {msg}")

        # Nothing half-written is left where a resume could pick it up.
        assert [p.name for p in ckdir.iterdir()] == ["step-000002"]
        assert [step for step, _ in ckpt.list_checkpoints(out)] == [2]
        assert ckpt.read_state(ckdir / "step-000002")["step"] == 2

        # Make room, run the same command again: it resumes from step-000002 and finishes.
        if why_not is None:
            subprocess.run(["mount", "-o", "remount,size=2m", str(disk)], check=True)
        done = _run(spec)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"resuming from {ckdir / 'step-000002'} (step 2)" in done.stderr
        summary = json.loads(done.stdout)
        assert summary["steps"] == 4 and summary["stop_reason"] == "completed"
        assert [step for step, _ in ckpt.list_checkpoints(out)] == [2, 4]
        assert not [p for p in ckdir.iterdir() if p.name.startswith(".tmp-")]
    finally:
        if why_not is None:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("make", [
    lambda: OSError(28, "No space left on device"),
    lambda: RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    lambda: OSError(27, "File too large"),
])
def test_out_of_space_errors_are_recognised_through_wrappers(make):
    exc = make()
    assert ckpt.out_of_space(exc)
    # torch.save raises RuntimeError("unexpected pos ...") with the OSError as its context.
    try:
        try:
            raise exc
        except Exception:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as wrapped:
        assert ckpt.out_of_space(wrapped)
    assert ckpt.out_of_space(RuntimeError("unexpected pos 704 vs 598")) is None
    assert ckpt.out_of_space(OSError(13, "Permission denied")) is None
