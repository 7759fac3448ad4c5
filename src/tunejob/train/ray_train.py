"""One job on several machines, placed by Ray Train: `tunejob run JOB.yaml --ray-address ADDRESS`.

The job runs as a Ray Train `TorchTrainer` with processes x nodes workers (placement SPREAD when
nodes > 1, so Ray puts them on different machines). Ray Train places the workers, forms the
torch.distributed group (gloo on CPU, NCCL on GPU) and restarts the group when a worker or its
node is lost (`FailureConfig(max_failures=distributed.max_failures)`). Each worker runs tunejob's
own `train()` unchanged: distributed.join() takes the group Ray formed, and from there the loop
is the one `--nproc` runs (the global batch split by rank, LoRA gradients summed, rank 0 alone
writing metrics, checkpoints and the summary, every decision all-reduced).

Storage: checkpoints go to the run directory (output_dir; serve's shared data dir), which every
node must see at the same path (NFS, a shared volume), not through Ray Train's reported
checkpoints. A restarted group resumes from the run directory's last checkpoint exactly as a
rerun of the command does, and the metrics stream drops the records past that checkpoint
(JsonlSink's truncate_after_step), so every step is in metrics.jsonl once. Reporting checkpoints to
Ray as well would copy each one into `storage_path` (a second copy on the same shared disk) in a
layout that `tunejob eval / export / serve` do not read. Ray's own run state goes to
RUN_DIR/ray (`RunConfig(storage_path=...)`), where the job's files are.

Each worker group appends one line to RUN_DIR/placement.jsonl: its workers' ranks, Ray node ids
and pids, and the checkpoint step it starts from; the driver counts the groups it started
(1 + restarts). Stop (SIGTERM to the driver: serve's pause and cancel): the workers run the
loop in a thread of their Ray actor, where no signal handler can live, so the driver writes
RUN_DIR/stop-requested and each worker's watcher turns it into train/stop.request_stop().
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from tunejob.errors import BackendError, Stopped, TunejobError
from tunejob.train import checkpoint as ckpt
from tunejob.train import distributed

PLACEMENT = "placement.jsonl"
STOP_FILE = "stop-requested"
GPU_ENV = "TUNEJOB_RAY_USE_GPU"  # "1" / "0": serve's executor says whether the job asked for GPUs; unset: any the cluster has


@dataclass(frozen=True)
class Placement:
    """How a job's workers are placed: what `tunejob plan` shows and the trainer asks Ray for."""

    workers: int
    nodes: int
    processes_per_node: int
    batch_per_worker: int
    cpus_per_worker: int
    gpus_per_worker: int
    strategy: str

    def describe(self) -> str:
        per = f"{self.cpus_per_worker} CPU" + (f" + {self.gpus_per_worker} GPU" if self.gpus_per_worker else "")
        return (f"{self.workers} Ray Train worker(s) = {self.processes_per_node} per node x {self.nodes} node(s), placement "
                f"{self.strategy}; each {per}, {self.batch_per_worker} example(s) of every step's batch")


def placement(spec, use_gpu: bool = False, cpus_per_worker: int = 1) -> Placement:
    d = spec.distributed
    return Placement(workers=d.world_size, nodes=d.nodes, processes_per_node=d.processes,
                     batch_per_worker=spec.resolved_batch_size() // d.world_size, cpus_per_worker=max(1, cpus_per_worker),
                     gpus_per_worker=1 if use_gpu else 0, strategy="SPREAD" if d.nodes > 1 else "PACK")


# ---------------------------------------------------------------- inside each Ray Train worker


def worker_loop(config: dict) -> None:
    """The function every Ray Train worker runs: record where it is, then tunejob's own train()."""
    import ray

    from tunejob.spec import load_spec
    from tunejob.train import stop
    from tunejob.train.trainer import train

    spec = load_spec(config["spec_path"], config["overrides"])
    world = distributed.join()  # the group Ray Train formed
    me = {"rank": world.rank, "node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
          "pid": os.getpid()}
    workers = distributed.gather_objects(world, me)
    run_dir = spec.run_dir
    if world.is_main:
        last = ckpt.last_checkpoint(run_dir)
        line = {"run": config["run"], "time": time.time(), "resumes_step": int(last.name.split("-")[-1]) if last else 0,
                "workers": workers}
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / PLACEMENT).open("a") as f:
            f.write(json.dumps(line) + "\n")
    stop.clear_request()
    done = threading.Event()
    watcher = threading.Thread(target=_watch_stop, args=(run_dir / STOP_FILE, done), daemon=True)
    watcher.start()
    try:
        train(spec, resume=None)  # a restarted group resumes from the run directory's last checkpoint
    except Stopped:
        pass  # checkpointed on request: the driver sees no fresh summary and says so
    finally:
        done.set()


def _watch_stop(path: Path, done: threading.Event) -> None:
    from tunejob.train.stop import request_stop

    while not done.wait(0.1):  # a stat a tenth of a second: a packed step of a small model takes less than 0.5 s
        if path.exists():
            request_stop()
            return


# ---------------------------------------------------------------- the driver


def _connect(address: str):
    try:
        import ray
    except ImportError:
        raise TunejobError("--ray-address needs Ray Train: pip install 'tunejob[ray]'") from None
    try:
        ray.init(address=address, logging_level="WARNING", configure_logging=True, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TunejobError(f"--ray-address {address}: cannot reach the Ray cluster ({str(exc).splitlines()[0][:200]}); "
                           "pass `auto` on a node of it, HEAD:6379 (its GCS address) or ray://HEAD:10001") from None
    return ray


def _worker_resources(ray, spec) -> tuple[bool, int]:
    """(use GPUs, CPUs per worker). GPUs: as serve's executor says, else when the cluster has one
    per worker. CPUs: TUNEJOB_THREADS where set (serve: the job's CPUs / processes), else the
    smallest node's CPUs shared by the processes a node runs."""
    from tunejob.train.threads import ENV

    workers = spec.distributed.world_size
    asked = os.environ.get(GPU_ENV)
    use_gpu = asked == "1" if asked in ("0", "1") else ray.cluster_resources().get("GPU", 0) >= workers
    if os.environ.get(ENV):
        return use_gpu, max(1, int(os.environ[ENV]))
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
    return use_gpu, max(1, int(min(node_cpus, default=1)) // spec.distributed.processes)


def run_on_ray(spec, spec_path: Path, overrides: list[str], resume: bool | None, address: str, say=None) -> dict:
    """Run the job as a Ray Train TorchTrainer; returns rank 0's summary with the placement."""
    from tunejob.data.splits import load_splits

    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    d = spec.distributed
    distributed.check_strategy(d.strategy, d.world_size)
    load_splits(spec)  # bad data: one message before any worker starts
    run_dir = spec.run_dir.resolve()
    existing = ckpt.last_checkpoint(run_dir)
    if existing is not None and resume is False:
        raise BackendError(f"{run_dir} already holds checkpoints (latest {existing.name}); resume it, or pick another output_dir")
    run, started = uuid.uuid4().hex[:12], time.time()
    stopping = _StopOnSigterm(run_dir / STOP_FILE)
    # stdout carries the summary alone: Ray prints the cluster's log lines to the driver's stdout
    with contextlib.redirect_stdout(sys.stderr):
        ray = _connect(address)
        try:
            use_gpu, cpus = _worker_resources(ray, spec)
            where = placement(spec, use_gpu, cpus)
            say(f"placing {where.describe()} on the Ray cluster; effective batch {spec.hyperparameters.batch_size}")
            # after ray.init, which sets its own SIGTERM handler (sys.exit): before it, a SIGTERM ended
            # the driver at once (exit 1) and the workers died with it, without their checkpoint
            with stopping:
                _trainer(spec, spec_path, overrides, run_dir, run, where).fit()
        except Exception as exc:  # TrainingFailedError: the workers' own messages are in their logs above
            raise BackendError(f"the Ray Train run stopped before finishing ({str(exc).splitlines()[0][:300]}); "
                               f"run the same command again to resume from the last checkpoint in {run_dir}") from None
        finally:
            ray.shutdown()
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file() or summary_path.stat().st_mtime < started:
        if stopping.signalled:
            raise Stopped("training stopped on request (SIGTERM); its checkpoint is saved: run the job again to resume")
        raise BackendError(f"the Ray Train workers finished without a summary in {run_dir}; their messages are above")
    groups = [g for g in read_placement(run_dir) if g["run"] == run]
    summary = json.loads(summary_path.read_text())
    summary["placement"] = {**asdict(where), "groups": len(groups), "restarts": max(0, len(groups) - 1),
                            "node_ids": sorted({w["node_id"] for w in groups[-1]["workers"]}) if groups else []}
    ckpt.write_json_atomic(summary_path, summary)
    return summary


def _trainer(spec, spec_path: Path, overrides: list[str], run_dir: Path, run: str, where: Placement):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tunejob.train.threads import child_env

    # workers start in another directory, maybe on another machine: absolute paths only
    config = {"spec_path": str(Path(spec_path).resolve()), "overrides": [*overrides, f"output_dir={run_dir}"], "run": run}
    resources = {"CPU": where.cpus_per_worker, **({"GPU": where.gpus_per_worker} if where.gpus_per_worker else {})}
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train would also route each worker's prints through its
    # logger, and the driver showed every line twice
    env = {**child_env(where.cpus_per_worker), "PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           **{k: v for k, v in os.environ.items() if k == "TUNEJOB_VERBOSE"}}
    return TorchTrainer(
        worker_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=where.workers, use_gpu=bool(where.gpus_per_worker), resources_per_worker=resources,
                                     placement_strategy=where.strategy),
        run_config=RunConfig(name=f"{spec.name}-{run}", storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=spec.distributed.max_failures),
                             worker_runtime_env={"env_vars": env}),
    )


def read_placement(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / PLACEMENT
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class _StopOnSigterm:
    """SIGTERM to the driver (Ray's job stop, serve's pause and cancel) writes the stop file the
    workers watch; they checkpoint the step in flight and return, and fit() returns."""

    def __init__(self, path: Path):
        self.path, self.signalled, self._previous = path, False, None

    def __enter__(self) -> "_StopOnSigterm":
        self.path.unlink(missing_ok=True)  # a stale request of an earlier run
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signalled = True
        self.path.write_text(f"{time.time()}\n")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        self.path.unlink(missing_ok=True)
