"""How many torch threads each process gets, from the cores this process may really use.

One helper for every torch process tunejob starts (a training run, `tunejob serve`'s chat), so
two of them on one machine never ask for more threads than there are cores: two torch processes
with 2 threads each on 2 cores ran ~40x slower than one (each thread spin-waits at the pool's
barriers while its core runs the other process).

The cores are the fewest of: the affinity mask (taskset, cpusets) and the cgroup's CPU quota
(cpu.max, containers' `--cpus`); os.cpu_count() counts the host's cores, which a container with
`--cpus 2` on a 64-core host would oversubscribe 32x.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ENV = "TUNEJOB_THREADS"  # set by serve's worker (and anyone) for a training child; wins over the budget


def available_cores() -> int:
    """Cores this process may use: affinity mask and cgroup quota, the smaller; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))  # 1.5 CPUs of quota keep 1 thread busy, not 2
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs the cgroup allows (cgroup v2 cpu.max "QUOTA PERIOD", v1 cfs files), None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Budget:
    """Threads for a server's training child and its in-process chat.

    Chat's share is a quarter of the cores, at least 1: generating one answer is a chain of small
    matrix-vector products that stop scaling after a few threads, while a training step's large
    matmuls use every core they get. The child gets the rest, so the two together use exactly the
    cores (2 cores: training 1, chat 1). When no job trains, chat uses all the cores (`chat_alone`).
    """

    cores: int
    train: int
    chat: int
    chat_alone: int


def budget(train: int | None = None, chat: int | None = None, cores: int | None = None) -> Budget:
    """The split of `cores` (default: available_cores()); `train` / `chat` override their share."""
    cores = cores or available_cores()
    chat_share = chat or max(1, cores // 4)
    train_share = train or max(1, cores - chat_share)
    return Budget(cores=cores, train=train_share, chat=chat_share, chat_alone=chat or cores)


def training_threads(processes: int = 1) -> int:
    """Threads for one training process: TUNEJOB_THREADS if set (serve's worker sets it), else
    OMP_NUM_THREADS (the distributed launch sets it per worker), else the cores shared by
    `processes` processes."""
    for name in (ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return max(1, available_cores() // max(1, processes))


def child_env(threads: int) -> dict[str, str]:
    """The environment entries that give a child process `threads` threads (torch, OpenMP, MKL)."""
    n = str(max(1, threads))
    return {ENV: n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def apply(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def other_training_threads() -> int:
    """Threads that other `tunejob run` processes on this machine (not our parent or children)
    are likely using: their TUNEJOB_THREADS / OMP_NUM_THREADS, or all the cores if they set none."""
    me, parent, total = os.getpid(), os.getppid(), 0
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid in (me, parent):
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not _is_training(argv) or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                continue
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (OSError, ValueError, IndexError):  # gone, or another user's: not ours to count
            continue
        value = (env.get(ENV.encode()) or env.get(b"OMP_NUM_THREADS") or b"").decode()
        total += int(value) if value.isdigit() else available_cores()
    return total


def _is_training(argv: list[bytes]) -> bool:
    """A Python process that runs tunejob's `run` itself: `python -m tunejob run ...`, or the
    `tunejob` script (the kernel's argv is `python /venv/bin/tunejob run ...`). Never a wrapper
    whose command line merely holds those words (`time`, `timeout`, a shell, accelerate's
    launcher): counting them warned of a second run where there was none (issue 36)."""
    words = [a.rsplit(b"/", 1)[-1] for a in argv if a]
    if not words or not words[0].startswith(b"python"):
        return False
    rest = words[1:]
    while rest and rest[0].startswith(b"-") and rest[0] != b"-m":  # the interpreter's own options (-u, -X dev)
        rest = rest[2:] if rest[0] in (b"-X", b"-W") else rest[1:]  # these two take a value
    if rest[:2] == [b"-m", b"tunejob"]:
        rest = rest[2:]
    elif rest[:1] == [b"tunejob"]:
        rest = rest[1:]
    else:
        return False
    commands = [w for w in rest if not w.startswith(b"-")]  # tunejob's own options (--verbose) come first
    return commands[:1] == [b"run"]


def warn_if_oversubscribed(threads: int, say=None) -> None:
    """One line if this process's threads plus other training runs' exceed the cores."""
    others, cores = other_training_threads(), available_cores()
    if others and others + threads > cores:
        (say or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"warning: another tunejob training run on this machine uses ~{others} thread(s); with this run's {threads} "
            f"that is more than the {cores} core(s): both will run many times slower. Run one at a time, or set "
            f"{ENV} so that they add up to {cores}")


# How much the server's own threads (HTTP, chat) yield to a training child on the same cores. The
# budget gives training its cores by thread count, but the server's threads are more than its
# chat share (event loop, threadpool, chat): at equal priority the scheduler splits the cores
# by runnable threads, and a 1-thread training child got 0.55 of its solo speed under 32 clients
# (bench/serve_load.py). At nice 10 (weight 110 against 1024) training keeps its cores; when no
# job trains, the server has every core as before. Nice is per thread on Linux, and inherited.
SERVER_NICE = 10


def yield_to_training(nice: int = SERVER_NICE) -> None:
    """Lower the calling thread's priority (and so of every thread it starts from now on). Call
    it after starting the thread that spawns training children: they inherit that one's."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), nice))
    except (AttributeError, OSError):  # not Linux, or not allowed: the server keeps its priority
        pass

