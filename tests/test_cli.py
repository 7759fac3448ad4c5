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
    spec.write_text("data: {train: nothere.jsonl}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 2
    assert "nothere.jsonl: no such file" in res.stderr and "Traceback" not in res.stderr


def test_unbuilt_backend_says_so(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    spec = tmp_path / "job.yaml"
    spec.write_text("backend: openai\nmodel: gpt-4o-mini\ndata: {train: d.jsonl}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 2 and "cannot run jobs yet" in res.stderr


def test_usage_error_is_exit_2():
    res = run_cli("validate")
    assert res.returncode == 2 and "Traceback" not in res.stderr
