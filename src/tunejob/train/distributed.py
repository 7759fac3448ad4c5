"""Training on several processes: the process group a worker sees, and launching the workers.

`tunejob run JOB.yaml --nproc N` (or `distributed.processes: N` in the spec) does not train in the
calling process: it starts `accelerate launch` (torchrun underneath) with N workers, each running
`tunejob run` again with TUNEJOB_WORKER=1. Every worker reads the same spec and data; the
step's global batch (batches.batch_order, a pure function of seed and epoch) is split by rank,
each rank's loss is divided by the global batch's trained-token count, and the LoRA gradients
are summed with one all_reduce: the update equals the one-process update on the same batch, so
changing the number of processes does not change the optimisation (only float summation order).
Rank 0 alone writes metrics, checkpoints and the summary; all ranks take every decision (NaN,
early stopping) from all-reduced numbers, so they stop together.

On CPU, accelerate's own multi-CPU path needs mpirun; its `--multi_gpu` launcher is plain
torchrun, so tunejob uses it everywhere and the workers join with gloo on CPU (NCCL on CUDA).

FSDP and DeepSpeed ZeRO: `accelerate_config()` writes the accelerate config (and its DeepSpeed
section) for a spec; the configs are validated against accelerate's own classes. tunejob's
training loop itself runs data-parallel (ddp) only: see `check_strategy`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunejob.errors import BackendError, SpecError

WORKER_ENV = "TUNEJOB_WORKER"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def in_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def join() -> World:
    """The process group of this process (one process: rank 0 of 1, no group)."""
    cuda = torch.cuda.is_available()
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # Ray Train formed it (ray_train.py)
        # Ray Train sets LOCAL_RANK and the worker's device (ACCELERATE_TORCH_DEVICE, e.g. cuda:0 or cpu)
        device = torch.device(os.environ.get("ACCELERATE_TORCH_DEVICE") or ("cuda" if cuda else "cpu"))
        return World(rank=torch.distributed.get_rank(), size=torch.distributed.get_world_size(),
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(device=torch.device("cuda" if cuda else "cpu"))
    from accelerate import PartialState

    _die_with_parent()
    # cpu=True: accelerate would otherwise not form a gloo group on a machine without GPUs.
    state = PartialState(cpu=not cuda)
    return World(rank=state.process_index, size=state.num_processes, local_rank=state.local_process_index, device=state.device)


def _die_with_parent() -> None:
    """This process gets SIGKILL when its parent dies: the launcher with `tunejob run`, each
    worker with the launcher (no orphan keeps training or holds the rendezvous port)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def sum_(world: World, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (identity on one process)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def sum_gradients(world: World, params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks in one flat all_reduce (a rank with no examples
    in this step contributes zeros)."""
    if not world.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_parameters(world: World, params: list[torch.nn.Parameter]) -> None:
    """Every rank starts from rank 0's adapter (as DDP does at construction)."""
    if world.distributed:
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def gather_objects(world: World, obj) -> list:
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


def check_strategy(strategy: str, size: int) -> None:
    if strategy != "ddp" and size > 1:
        raise BackendError(
            f"distributed.strategy: '{strategy}' is not run by tunejob's training loop yet (it trains data-parallel: "
            "'ddp'); a LoRA adapter is small enough to replicate, so use ddp, or take the accelerate config from "
            "`tunejob distributed-config JOB.yaml` to your own FSDP / DeepSpeed script"
        )


# ---------------------------------------------------------------- launching


def _precision(spec) -> str:
    """'auto' resolved for the workers' devices: accelerate knows only 'no' / 'bf16' / 'fp16'.
    The launch is --multi_gpu, so the workers train on CUDA; this resolves on the launching node."""
    from tunejob.train.precision import resolve

    return resolve(spec.hyperparameters.mixed_precision, "cuda", spec.quantization)


def launch_command(spec, spec_path: Path, overrides: list[str], resume: bool | None) -> list[str]:
    """The `accelerate launch` command line that runs this job's workers on this node."""
    d = spec.distributed
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(d.processes * d.nodes), "--num_machines", str(d.nodes), "--machine_rank", str(d.node_rank),
           "--main_process_port", str(d.main_process_port), "--mixed_precision", _precision(spec), "--dynamo_backend", "no"]
    if d.nodes > 1:
        cmd += ["--main_process_ip", str(d.main_process_ip)]
    cmd += ["-m", "tunejob", "run", str(spec_path)]
    for item in overrides:
        cmd += ["--set", item]
    if resume is not None:
        cmd.append("--resume" if resume else "--no-resume")
    return cmd


def run_workers(spec, spec_path: Path, overrides: list[str], resume: bool | None) -> dict:
    """Launch the workers, pass rank 0's output through, and return the run's summary.

    The data is validated here first, so bad input is one message and exit 2 before any worker
    starts. The launcher's own traceback (torchrun reports a failed worker as a ChildFailedError)
    goes to RUN_DIR/launcher.log, not to the terminal: the worker has said what went wrong.
    """
    import json

    from tunejob.data.splits import load_splits

    d = spec.distributed
    check_strategy(d.strategy, d.world_size)
    if d.nodes > 1 and not d.main_process_ip:
        raise SpecError(f"distributed.nodes: {d.nodes} machines need a Ray cluster to place them: pass --ray-address ADDRESS "
                        "(`auto` on a node of it), or set distributed.main_process_ip to node 0's address and run the "
                        "command on every node with --set distributed.node_rank=K")
    load_splits(spec)
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    from tunejob.train import threads

    env = {**os.environ, WORKER_ENV: "1", **threads.child_env(threads.training_threads(d.processes))}
    print(f"launching {d.processes} worker process(es) on this node ({d.world_size} in all) with accelerate; "
          f"effective batch {spec.hyperparameters.batch_size} = micro-batch x {spec.hyperparameters.gradient_accumulation} accumulation x {d.world_size} processes",
          file=sys.stderr, flush=True)
    started = time.time()
    proc = subprocess.Popen(launch_command(spec, spec_path, overrides, resume), env=env, preexec_fn=_die_with_parent,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    log_lines: list[str] = []
    in_traceback = False
    try:
        for line in proc.stderr:
            in_traceback = in_traceback or line.startswith("Traceback (most recent call last)") or "ChildFailedError" in line
            if in_traceback or line.startswith(("W1", "E1", "I1")) and "torch" in line:  # launcher chatter
                log_lines.append(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
    if log_lines:
        (run_dir / "launcher.log").write_text("".join(log_lines))
    summary_path = run_dir / "summary.json"
    if code != 0 or not summary_path.is_file() or summary_path.stat().st_mtime < started:
        raise BackendError(f"the {d.world_size} worker processes stopped (launcher exit {code}) before finishing; "
                           f"their messages are above, the launcher's in {run_dir / 'launcher.log'}; "
                           "run the same command again to resume from the last checkpoint")
    return json.loads(summary_path.read_text())


# ---------------------------------------------------------------- accelerate configs (FSDP, DeepSpeed)


def accelerate_config(spec, layer_class: str | None = None) -> dict:
    """The accelerate config (as `accelerate config` writes it) for the spec's distributed section."""
    d = spec.distributed
    cfg = {"compute_environment": "LOCAL_MACHINE", "debug": False, "num_processes": d.processes * d.nodes, "num_machines": d.nodes,
           "machine_rank": d.node_rank, "main_process_ip": d.main_process_ip, "main_process_port": d.main_process_port,
           "mixed_precision": _precision(spec), "rdzv_backend": "static", "same_network": True, "use_cpu": False,
           "downcast_bf16": "no", "gpu_ids": "all", "main_training_function": "main", "enable_cpu_affinity": False}
    accumulation = spec.hyperparameters.gradient_accumulation
    if d.strategy == "ddp":
        cfg["distributed_type"] = "MULTI_GPU"
    elif d.strategy == "fsdp":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            # the decoder block class; LlamaDecoderLayer covers SmolLM2 and Llama-family bases
            "fsdp_transformer_layer_cls_to_wrap": layer_class or "LlamaDecoderLayer",
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": False,
        }
    else:
        stage = 2 if d.strategy == "deepspeed-zero2" else 3
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "zero_stage": stage, "gradient_accumulation_steps": accumulation, "gradient_clipping": 1.0,
            "offload_optimizer_device": "none", "offload_param_device": "none",
            **({"zero3_init_flag": True, "zero3_save_16bit_model": True} if stage == 3 else {}),
        }
    return cfg


def validate_accelerate_config(path: Path) -> None:
    """Load a written config through accelerate's own classes (unknown keys, bad enums fail)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    cfg = ClusterConfig.from_yaml_file(str(path))
    if cfg.distributed_type == DistributedType.FSDP:
        from accelerate.utils import FullyShardedDataParallelPlugin

        # the config file's names -> the plugin's (accelerate launch does the same via FSDP_* variables)
        rename = {"fsdp_version": "fsdp_version", "fsdp_offload_params": "cpu_offload",
                  "fsdp_transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap"}
        kw = {rename.get(k, k.removeprefix("fsdp_")): v for k, v in cfg.fsdp_config.items()}
        if isinstance(kw.get("auto_wrap_policy"), str):
            kw["auto_wrap_policy"] = kw["auto_wrap_policy"].lower()
        if isinstance(kw.get("transformer_cls_names_to_wrap"), str):
            kw["transformer_cls_names_to_wrap"] = kw["transformer_cls_names_to_wrap"].split(",")
        FullyShardedDataParallelPlugin(**kw)  # raises on an unknown policy, strategy or state-dict type
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        ds = cfg.deepspeed_config
        if ds.get("zero_stage") not in (0, 1, 2, 3) or ds.get("offload_optimizer_device") not in ("none", "cpu", "nvme"):
            raise SpecError(f"{path}: deepspeed_config has an invalid zero_stage or offload device: {ds}")


def write_accelerate_config(spec, out: Path, layer_class: str | None = None) -> Path:
    import yaml

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(accelerate_config(spec, layer_class), sort_keys=False))
    validate_accelerate_config(out)
    return out
