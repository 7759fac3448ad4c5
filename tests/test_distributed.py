"""Several processes: gloo on CPU through accelerate's launcher (torchrun), the same losses as one
process, resume of a killed multi-process run, and the FSDP / DeepSpeed configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import run_cli, write_chat_data
from tunejob.server.run import free_port
from tunejob.train.distributed import accelerate_config, launch_command, validate_accelerate_config, write_accelerate_config
from tunejob.errors import SpecError
from tunejob.monitor.metrics import read_metrics
from tunejob.spec import parse_spec as _parse_text


def parse_spec(raw: dict):
    return _parse_text(yaml.safe_dump(raw))


def spec_text(model: Path, data: Path, out: Path, extra: str = "", hp: str = "") -> str:
    # lr 0.02 on the tiny model: the losses move a lot, so equal curves are not equal by accident.
    # fp32 on every CPU: `auto` picks bf16 where the CPU has bf16 units, and bf16 rounding differs
    # between one process's GEMM shapes and two's (4e-4 on an AMX CPU) by more than the 1e-4 compared
    return (f"model: {model}\ndata: {{train: {data}, val_fraction: 0.25}}\noutput_dir: {out}\n"
            f"hyperparameters: {{epochs: 3, batch_size: 4, learning_rate: 0.02, max_seq_len: 64, warmup: 0, mixed_precision: 'no'{hp}}}\n"
            "lora: {r: 4, dropout: 0.0}\ncheckpointing: {eval_steps: 3, save_steps: 3, early_stopping_patience: null}\n" + extra)


def losses(run: Path, kind: str) -> list[tuple[int, float]]:
    key = "train_loss" if kind == "train" else "valid_loss"
    return [(r["step"], r[key]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


# ---------------------------------------------------------------- spec and configs (fast)


def test_effective_batch_must_split_evenly_over_processes():
    with pytest.raises(SpecError) as err:
        parse_spec({"model": "m", "data": {"train": "t.jsonl"}, "hyperparameters": {"batch_size": 6, "gradient_accumulation": 1},
                    "distributed": {"processes": 4}})
    msg = str(err.value)
    assert "hyperparameters.batch_size" in msg and "x 4 processes" in msg and "set it to 8" in msg


def test_several_nodes_need_a_valid_rank():
    with pytest.raises(SpecError) as err:
        parse_spec({"model": "m", "data": {"train": "t.jsonl"}, "distributed": {"nodes": 2, "node_rank": 2}})
    assert "distributed.node_rank" in str(err.value)


def test_several_nodes_without_ray_or_main_address_is_one_line_naming_both_fixes(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", 8)
    job = tmp_path / "job.yaml"
    job.write_text(f"model: m\ndata: {{train: {data}}}\ndistributed: {{nodes: 2}}\n")
    res = run_cli("run", str(job))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.strip()]
    assert "distributed.nodes" in line and "--ray-address" in line and "distributed.main_process_ip" in line


def test_api_backends_take_no_distributed_section():
    with pytest.raises(SpecError) as err:
        parse_spec({"backend": "openai", "model": "gpt-4o-mini-2024-07-18", "data": {"train": "t.jsonl"}, "distributed": {"processes": 2}})
    assert "distributed:" in str(err.value)


def test_launch_command_for_one_node_of_two():
    spec = parse_spec({"model": "m", "data": {"train": "t.jsonl"}, "hyperparameters": {"batch_size": 16},
                       "distributed": {"processes": 4, "nodes": 2, "node_rank": 1, "main_process_ip": "10.0.0.1", "main_process_port": 29400}})
    cmd = launch_command(spec, Path("job.yaml"), ["distributed.processes=4"], resume=None)
    flags = dict(zip(cmd[cmd.index("--num_processes"):cmd.index("-m", 3):2], cmd[cmd.index("--num_processes") + 1:cmd.index("-m", 3):2]))
    assert flags == {"--num_processes": "8", "--num_machines": "2", "--machine_rank": "1", "--main_process_port": "29400",
                     "--mixed_precision": "no", "--dynamo_backend": "no", "--main_process_ip": "10.0.0.1"}
    assert cmd[-5:] == ["tunejob", "run", "job.yaml", "--set", "distributed.processes=4"]


@pytest.mark.parametrize("strategy, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed-zero2", "DEEPSPEED"), ("deepspeed-zero3", "DEEPSPEED")])
def test_accelerate_configs_are_generated_and_accepted_by_accelerate(tmp_path, strategy, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    spec = parse_spec({"model": "m", "data": {"train": "t.jsonl"}, "hyperparameters": {"batch_size": 16, "gradient_accumulation": 2, "mixed_precision": "bf16"},
                       "distributed": {"processes": 8, "strategy": strategy}})
    path = write_accelerate_config(spec, tmp_path / "acc.yaml")  # validates through accelerate's classes
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.distributed_type.value == kind and cfg.num_processes == 8 and cfg.mixed_precision == "bf16"
    if strategy == "fsdp":
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    if strategy.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(strategy[-1]) and cfg.deepspeed_config["gradient_accumulation_steps"] == 2


def test_config_validation_rejects_what_accelerate_rejects(tmp_path):
    spec = parse_spec({"model": "m", "data": {"train": "t.jsonl"}, "distributed": {"strategy": "fsdp"}})
    cfg = accelerate_config(spec)
    bad_key = tmp_path / "bad-key.yaml"
    bad_key.write_text(yaml.safe_dump({**cfg, "fsdp_confg": {}}))
    with pytest.raises(ValueError, match="unknown keys"):
        validate_accelerate_config(bad_key)
    bad_policy = tmp_path / "bad-policy.yaml"
    bad_policy.write_text(yaml.safe_dump({**cfg, "fsdp_config": {**cfg["fsdp_config"], "fsdp_auto_wrap_policy": "EVERYTHING"}}))
    with pytest.raises(ValueError, match="auto wrap policy"):
        validate_accelerate_config(bad_policy)


def test_distributed_config_cli_writes_a_config(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: m\ndata: {train: t.jsonl}\ndistributed: {processes: 2, strategy: deepspeed-zero3}\n")
    res = run_cli("distributed-config", str(job), "--out", str(tmp_path / "acc.yaml"))
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load((tmp_path / "acc.yaml").read_text())["deepspeed_config"]["zero_stage"] == 3


def test_fsdp_training_is_refused_with_the_way_forward(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 12)
    job = tmp_path / "job.yaml"
    job.write_text(spec_text(tiny_model, data, tmp_path / "run", "distributed: {strategy: fsdp}\n"))
    res = run_cli("run", str(job), "--nproc", "2")
    assert res.returncode == 2 and "distributed.strategy" in res.stderr and "ddp" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------- real processes (slow)


@pytest.mark.slow
def test_two_processes_match_one_process_and_a_killed_run_resumes(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 32)  # 24 train / 8 validation, 6 steps per epoch, 18 steps
    runs = {}
    for name, nproc in (("one", None), ("two", 2)):
        job = tmp_path / f"{name}.yaml"
        job.write_text(spec_text(tiny_model, data, tmp_path / name, f"distributed: {{main_process_port: {free_port()}}}\n"))
        res = run_cli("run", str(job), *(["--nproc", str(nproc)] if nproc else []))
        assert res.returncode == 0, res.stderr
        runs[name] = json.loads(res.stdout)
    assert runs["two"]["processes"] == 2 and runs["two"]["effective_batch_size"] == 4 and runs["two"]["batch_per_process"] == 2
    v1, v2 = losses(tmp_path / "one", "eval"), losses(tmp_path / "two", "eval")
    assert [s for s, _ in v1] == [s for s, _ in v2] == [3, 6, 9, 12, 15, 18]
    # Same global batches, same gradient (summed over ranks): only float summation order differs,
    # which moves fp32 losses by ~1e-6 over 18 steps (measured); 1e-4 leaves room and still catches
    # a wrong normalisation (dividing by the local token count moved them by 2e-3 to 2e-2, measured).
    assert max(abs(a - b) for (_, a), (_, b) in zip(v1, v2)) < 1e-4, (v1, v2)
    assert v2[-1][1] < v2[0][1] - 0.5, "the runs really trained"
    t2 = losses(tmp_path / "two", "train")
    assert [s for s, _ in t2] == list(range(1, 19)), "one stream: every step exactly once"

    # kill a 2-process run after its step-6 checkpoint (SIGKILL to `tunejob run` alone: the
    # launcher and both workers must die with it), then resume it with the same command
    job = tmp_path / "killed.yaml"
    port = free_port()
    job.write_text(spec_text(tiny_model, data, tmp_path / "killed", f"distributed: {{main_process_port: {port}}}\n"))
    proc = subprocess.Popen([sys.executable, "-m", "tunejob", "run", str(job), "--nproc", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt6 = tmp_path / "killed" / "checkpoints" / "step-000006"
    deadline = time.time() + 300
    while not ckpt6.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt6.is_dir(), "the run reached its step-6 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while _processes_mentioning(str(job)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(str(job)), "no orphan worker outlives the killed run"
    steps_before = max(s for s, _ in losses(tmp_path / "killed", "train"))
    assert steps_before < 18

    res = run_cli("run", str(job), "--nproc", "2")
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr
    tk, t2 = losses(tmp_path / "killed", "train"), losses(tmp_path / "two", "train")
    assert [s for s, _ in tk] == list(range(1, 19))
    assert max(abs(a - b) for (_, a), (_, b) in zip(tk, t2)) < 1e-4
    final_k = load_file(str(tmp_path / "killed" / "checkpoints" / "step-000018" / "adapter_model.safetensors"))
    final_2 = load_file(str(tmp_path / "two" / "checkpoints" / "step-000018" / "adapter_model.safetensors"))
    assert max(float((final_k[k] - final_2[k]).abs().max()) for k in final_2) < 1e-5


def _processes_mentioning(text: str) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                out.append(cmd)
    return out
