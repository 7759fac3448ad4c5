"""What one job may ask of this server: the caps of `tunejob serve --max-*` (ServerConfig), checked
when the job is created, so a job over one is a 400 naming its field and the cap rather than a run
that takes the machine (issue 31, finding 10: `distributed.processes` went up to 1024 and
`batch_size` was uncapped, for any key holder).

Processes are capped at this machine's GPUs (one process each), or its cores on a host without
one: a 3rd gloo process on 2 cores only slows the other two. The local executor can give a job
no more CPUs than the machine has, nor GPUs it lacks; Ray's nodes are other machines, so there
only the process cap holds (Ray itself refuses what no node has).
"""

from __future__ import annotations

from tunejob.server.errors import ApiError

from tunejob.server.config import ServerConfig
from tunejob.server.jobs.executor import Resources, resources_for, visible_gpus
from tunejob.spec import LOCAL_AUTO_EPOCHS
from tunejob.train.threads import available_cores


def max_processes(config: ServerConfig) -> int:
    """--max-processes, or this machine's GPUs, or its cores where it has none."""
    return config.max_processes or len(visible_gpus()) or available_cores()


def _over(param: str, value, cap, why: str) -> ApiError:
    return ApiError(400, f"{param}={value:g} is over this server's limit of {cap:g} ({why}); ask for at most {cap:g}", param=param)


def check_spec(config: ServerConfig, spec, asked: dict) -> None:
    """The server's caps on a checked JobSpec, whichever field asked for more. `asked`: the job's
    `tunejob.hyperparameters`, to name the field a batch size came from."""
    h = spec.hyperparameters
    epochs = h.epochs if h.epochs != "auto" else LOCAL_AUTO_EPOCHS
    for name, value, cap, flag in (("epochs", epochs, config.max_epochs, "--max-epochs"), ("max_steps", h.max_steps or 0, config.max_steps, "--max-steps"),
                                   ("max_seq_len", h.max_seq_len, config.max_seq_len, "--max-seq-len")):
        if value > cap:
            raise _over(f"tunejob.hyperparameters.{name}", value, cap, f"the server's {flag}")
    batch = spec.resolved_batch_size()
    if batch > config.max_batch_size:
        param = "tunejob.hyperparameters.batch_size" if "batch_size" in asked else "hyperparameters.batch_size"
        raise _over(param, batch, config.max_batch_size, "the server's --max-batch-size")
    processes, cap = spec.distributed.processes, max_processes(config)
    if processes > cap:
        raise _over("tunejob.distributed.processes", processes, cap, "the server's --max-processes")


def job_resources(config: ServerConfig, spec: dict, requested, default_cpus: float | None) -> Resources:
    """The job's resources (executor.resources_for), or a 400 if this server could never give them."""
    resources = resources_for(spec, requested, default_cpus)
    cap = max_processes(config)
    if resources.gpus > cap:
        raise _over("tunejob.resources.gpus", resources.gpus, cap, "the server's --max-processes: one process per GPU")
    if config.executor != "local":
        return resources
    gpus, cores = len(visible_gpus()), available_cores()
    if resources.gpus > gpus:
        raise _over("tunejob.resources.gpus", resources.gpus, gpus, "the GPUs of the machine this server trains on")
    if requested and requested.cpus and requested.cpus > cores:
        raise _over("tunejob.resources.cpus", requested.cpus, cores, "the cores of the machine this server trains on")
    return resources
