"""The CLI: exit codes, one-line errors, no tracebacks."""

from conftest import run_cli


def test_help_lists_the_commands():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("validate", "split", "run", "demo", "chat", "export"):
        assert cmd in res.stdout


def test_bad_spec_is_exit_2_without_traceback(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("data: {train: t.jsonl}\nhyperparameters: {epochs: -1}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 2
    assert "hyperparameters.epochs" in res.stderr and "Traceback" not in res.stderr


def test_missing_data_file_is_one_clear_line(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"data: {{train: nothere.jsonl}}\noutput_dir: {tmp_path / 'run'}\n")
    res = run_cli("run", str(spec), cwd=tmp_path)
    assert res.returncode == 2
    assert "nothere.jsonl: no such file" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()  # a job that cannot start leaves nothing behind


def test_api_backend_validates_the_data_before_anything_is_sent(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    spec = tmp_path / "job.yaml"
    spec.write_text("backend: openai\nmodel: gpt-4o-mini\ndata: {train: d.jsonl}\n")
    res = run_cli("run", str(spec), env={"TUNEJOB_HOME": str(tmp_path / "home"), "OPENAI_API_KEY": "sk-x"})
    assert res.returncode == 2 and "no examples" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "home" / "jobs.sqlite3").exists() or "tj-" not in run_cli("jobs", env={"TUNEJOB_HOME": str(tmp_path / "home")}).stdout


def test_usage_error_is_exit_2():
    res = run_cli("validate")
    assert res.returncode == 2 and "Traceback" not in res.stderr
