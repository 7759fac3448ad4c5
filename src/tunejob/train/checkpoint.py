"""Run directories and checkpoints.

    runs/<name>/
      config.yaml                  the resolved job spec
      metrics.jsonl                the metric stream
      checkpoints/step-000100/     adapter (PEFT format) + optimizer.pt + scheduler.pt + rng.pt + state.json
      best -> checkpoints/step-000080   (and best.json, for tools that do not follow links)
      summary.json

A checkpoint is written into a temporary directory beside its target and renamed into place, so a
directory named step-NNNNNN is complete by construction: a run killed mid-save leaves only a
`.tmp-` directory, which is never loaded and is removed on the next save. A save that runs out of
disk space removes its `.tmp-` directory at once and stops the run with a BackendError that names
the directory and the checkpoint that is still intact.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from tunejob.errors import BackendError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / "state.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def last_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "state.json").read_text())


def save_checkpoint(run_dir: Path, step: int, write_contents) -> Path:
    """Create checkpoints/step-NNNNNN atomically; `write_contents(tmp_dir)` fills it, and must
    write state.json last."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    target = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    try:
        write_contents(tmp)
        _fsync_tree(tmp)
        if target.exists():  # a re-save of the same step after resume: replace it whole
            old = root / f".tmp-old-{step_dir_name(step)}-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException as exc:
        reason = out_of_space(exc) if isinstance(exc, Exception) else None
        # Measured before the cleanup frees the partial files; a file-size limit is not about room.
        room = _room(root) if reason and reason != os.strerror(errno.EFBIG) else ""
        shutil.rmtree(tmp, ignore_errors=True)
        if reason:  # a traceback would only hide the one thing to do: make room
            raise BackendError(_no_space_message(run_dir, root, step, f"{reason}{room}")) from None
        raise
    _fsync_dir(root)
    return target


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def out_of_space(exc: BaseException) -> str | None:
    """The reason ("No space left on device", "Disk quota exceeded", "File too large") when an
    exception comes from a full disk, quota or file-size limit, else None.

    The writers wrap the OSError: torch.save given a Python file raises RuntimeError("unexpected
    pos ...") with the OSError as its __context__, and safetensors (Rust) keeps only the text "No
    space left on device (os error 28)"; so walk the chain, then match the C library's wording.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for code in _NO_SPACE:
            if (isinstance(exc, OSError) and exc.errno == code) or os.strerror(code) in str(exc):
                return os.strerror(code)
        exc = exc.__cause__ or exc.__context__
    return None


def _room(path: Path) -> str:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return ""
    return f" ({usage.free // 1024:,} KiB free of {usage.total // 1024:,} KiB on that disk)"


def _no_space_message(run_dir: Path, root: Path, step: int, reason: str) -> str:
    previous = last_checkpoint(run_dir)
    if previous is not None:
        size = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
        kept = (f"the previous checkpoint {previous.name} ({size // 1024:,} KiB) is complete, and running the same "
                f"`tunejob run` again resumes from it")
    else:
        kept = "no earlier checkpoint exists, so running it again starts from step 0"
    fix = "Free space on that disk, or set output_dir to a directory on a disk with room"
    if reason.startswith(os.strerror(errno.EFBIG)):  # a per-file limit, not a full disk
        fix = "Raise the file-size limit (`ulimit -f`), or set output_dir to a filesystem without one"
    return f"cannot save checkpoint {step_dir_name(step)} in {root}: {reason}. The partial checkpoint was removed; {kept}. {fix}."


def _fsync_tree(path: Path) -> None:
    for child in path.rglob("*"):
        if child.is_file():
            with child.open("rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def mark_best(run_dir: Path, ckpt: Path, step: int, valid_loss: float) -> None:
    """Point `best` (a relative symlink) and best.json at a checkpoint."""
    run_dir = Path(run_dir)
    rel = os.path.relpath(ckpt, run_dir)
    link = run_dir / "best"
    tmp = run_dir / f".best.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(rel, target_is_directory=True)
    tmp.replace(link)
    write_json_atomic(run_dir / "best.json", {"step": step, "path": rel, "valid_loss": valid_loss})


def best_checkpoint(run_dir: Path) -> Path | None:
    """The best checkpoint of a run, else its last one."""
    run_dir = Path(run_dir)
    info = run_dir / "best.json"
    if info.is_file():
        path = run_dir / json.loads(info.read_text())["path"]
        if (path / "state.json").is_file():
            return path
    return last_checkpoint(run_dir)


def prune(run_dir: Path, keep_last: int | None, protect: set[Path]) -> None:
    """Delete all but the newest `keep_last` checkpoints, never one in `protect` (the best)."""
    if not keep_last:
        return
    ckpts = [p for _, p in list_checkpoints(run_dir)]
    protected = {p.resolve() for p in protect}
    for path in ckpts[:-keep_last]:
        if path.resolve() not in protected:
            shutil.rmtree(path, ignore_errors=True)
