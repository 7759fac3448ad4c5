"""`tunejob grade GRADER.json DATA.jsonl --samples FILE [--json]`, run as a person runs it (a
subprocess of `python -m tunejob`): the table and the mean, --json, and each bad input as one
line naming the file (and line) with exit code 2, never a traceback."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

GRADER = {"type": "multi", "name": "city grader", "calculate_output": "0.5 * exact + 0.5 * near",
          "graders": {"exact": {"type": "string_check", "name": "exact", "input": "{{sample.output_json.city}}", "reference": "{{item.city}}", "operation": "eq"},
                      "near": {"type": "text_similarity", "name": "near", "input": "{{sample.output_text}}", "reference": "{{item.city}}", "evaluation_metric": "fuzzy_match"}}}
DATA = [{"messages": [{"role": "user", "content": "Capital of France? Answer in JSON."}], "city": "Paris"},
        {"messages": [{"role": "user", "content": "Capital of Italy? Answer in JSON."}], "city": "Rome"}]
SAMPLES = [json.dumps({"city": "Paris"}), {"output_text": "Milan"}]  # a bare JSON string, then the object form


def write(path, lines) -> str:
    """One JSON value a line; a bytes line is written as it is (a broken line)."""
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines))
    return str(path)


@pytest.fixture
def files(tmp_path):
    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps(GRADER))
    return str(grader), write(tmp_path / "data.jsonl", DATA), write(tmp_path / "samples.jsonl", SAMPLES), tmp_path


def test_a_table_and_the_mean(files):
    grader, data, samples, _ = files
    out = run_cli("grade", grader, data, "--samples", samples)
    assert out.returncode == 0, out.stderr
    # near: rapidfuzz's WRatio of 'city paris' and 'paris' (punctuation gone), a partial match scaled to 90
    assert "city grader (multi)" in out.stdout and "exact 1.000, near 0.900" in out.stdout
    assert "graders.exact:" in out.stdout and "sample is not a JSON object" in out.stdout  # line 2 answered plain text
    assert "mean 0.4750 over 2 samples" in out.stdout  # (1 + 0.9) / 2 and 0


def test_json(files):
    grader, data, samples, _ = files
    out = run_cli("grade", grader, data, "--samples", samples, "--json")
    result = json.loads(out.stdout)
    assert result["count"] == 2 and result["mean"] == pytest.approx(0.475) and [r["line"] for r in result["rows"]] == [1, 2]
    assert result["rows"][0] == {"line": 1, "score": pytest.approx(0.95), "sub_scores": {"exact": 1.0, "near": pytest.approx(0.9)}, "errors": []}
    assert result["rows"][1]["score"] == 0.0 and result["rows"][1]["errors"][0].startswith("graders.exact: {{sample.output_json.city}}")


def bad_inputs(tmp_path, grader, data, samples):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**GRADER, "graders": {**GRADER["graders"], "exact": {**GRADER["graders"]["exact"], "operation": "contains"}}}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "string_check",\n "name": }')
    return [
        ((grader, str(tmp_path / "nope.jsonl"), "--samples", samples), f"{tmp_path / 'nope.jsonl'}: no such file"),
        ((str(broken), data, "--samples", samples), f"{broken}:2: not valid JSON"),
        ((str(wrong), data, "--samples", samples), f"{wrong}: grader.graders.exact.operation: 'contains' is not one of eq, ne, like, ilike"),
        ((grader, write(tmp_path / "d.jsonl", [DATA[0], b"{oops"]), "--samples", samples), f"{tmp_path / 'd.jsonl'}:2: not valid JSON"),
        ((grader, write(tmp_path / "l.jsonl", [DATA[0], [1, 2]]), "--samples", samples), f"{tmp_path / 'l.jsonl'}:2: a data line is a JSON object"),
        ((grader, data, "--samples", write(tmp_path / "s.jsonl", [SAMPLES[0]])), "1 samples for 2 data lines"),
        ((grader, data, "--samples", write(tmp_path / "n.jsonl", [SAMPLES[0], {"text": "x"}])), f"{tmp_path / 'n.jsonl'}:2: a sample line is a JSON string"),
        ((grader, write(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])),
         f"{tmp_path / 'a.jsonl'}:1: the last message is the \"assistant\"'s"),  # no --samples: the model answers prompts only
    ]


def test_each_bad_input_is_one_line_and_exit_2(files):
    grader, data, samples, tmp_path = files
    for args, message in bad_inputs(tmp_path, grader, data, samples):
        out = run_cli("grade", *args)
        assert out.returncode == 2 and out.stdout == "", (args, out.stdout, out.stderr)
        assert out.stderr.splitlines() == [out.stderr.strip()] and message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_without_samples_the_model_answers_each_prompt_greedily(files, tiny_model):
    """The answers training starts from, graded: the same model twice gives the same answers."""
    grader, data, _, _ = files
    runs = [run_cli("grade", grader, data, "--model", str(tiny_model), "--max-tokens", "6", "--json") for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    first, second = (json.loads(r.stdout) for r in runs)
    assert first["count"] == len(DATA) and first == second
    assert all(0.0 <= row["score"] <= 1.0 for row in first["rows"])
