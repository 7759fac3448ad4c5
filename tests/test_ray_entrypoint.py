"""The Ray job's entrypoint finds tunejob through the server's interpreter, not the node's PATH
(issue 35), and a node without it fails with one line that says so. The real two-node cluster
of tests/test_serve_ray.py runs jobs with the venv's bin off PATH; here, the shell command itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tunejob.server.jobs.executor import Launch, Resources
from tunejob.server.jobs.ray_cluster import NOT_INSTALLED, RayExecutor, entrypoint


def _launch(tmp_path: Path) -> Launch:
    spec = tmp_path / "job.yaml"
    spec.write_text("data: {train: missing.jsonl}\n")
    return Launch(job_id="ftjob-x", spec_path=spec, log_path=tmp_path / "train.log", processes=1, resources=Resources(cpus=1))


def test_the_entrypoint_runs_tunejob_with_no_venv_on_path(tmp_path):
    env = dict(os.environ, PATH="/usr/bin:/bin")
    done = subprocess.run(["/bin/sh", "-c", entrypoint(_launch(tmp_path))], env=env, timeout=120)
    log = (tmp_path / "train.log").read_text()
    assert done.returncode == 2 and "missing.jsonl" in log, log  # tunejob ran, and refused the missing data in one line


def test_an_interpreter_missing_on_the_node_is_exit_127_and_one_line(tmp_path):
    for python in ("/nonexistent/python3", "/usr/bin/env"):  # not there; there but without tunejob
        done = subprocess.run(["/bin/sh", "-c", entrypoint(_launch(tmp_path), python)], timeout=60)
        assert done.returncode == NOT_INSTALLED, python

    class Info:
        status = type("S", (), {"value": "FAILED"})()
        error_type, driver_exit_code, driver_node_id, message = "JOB_ENTRYPOINT_COMMAND_ERROR", NOT_INSTALLED, "a1b2c3d4e5f6aa", ""

    executor = RayExecutor.__new__(RayExecutor)
    executor.client = type("C", (), {"get_job_info": lambda self, run_id: Info()})()
    state = executor.poll("tunejob-ftjob-x-1")
    assert state.state == "failed" and state.detail.startswith("tunejob is not installed on the Ray node") and sys.executable in state.detail


def test_a_job_over_several_nodes_is_a_ray_train_driver_that_holds_no_cpu(tmp_path):
    from tunejob.server.jobs.ray_cluster import run_env

    one, two = _launch(tmp_path), Launch(job_id="ftjob-y", spec_path=tmp_path / "job.yaml", log_path=tmp_path / "train.log",
                                         processes=1, nodes=2, resources=Resources(cpus=2, gpus=1))
    assert "--ray-address" not in entrypoint(one) and entrypoint(two).endswith(f"--ray-address auto >> {tmp_path / 'train.log'} 2>&1")
    assert run_env(two)["TUNEJOB_RAY_USE_GPU"] == "1" and "TUNEJOB_RAY_USE_GPU" not in run_env(one)
    submitted = {}
    executor = RayExecutor.__new__(RayExecutor)
    executor.stop_grace_s = 10
    executor.client = type("C", (), {"submit_job": lambda self, **kw: submitted.update(kw)})()
    line = executor.submit("tunejob-ftjob-y-1", two)
    assert submitted["entrypoint_num_cpus"] == 0 and submitted["entrypoint_num_gpus"] is None and "2 workers over 2 nodes" in line
