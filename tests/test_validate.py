"""Dataset validation: the report's content, the JSON contract, Bedrock rules, statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli, write_chat_data
from tunejob.data.dataset import iter_raw_lines, split_examples, split_file
from tunejob.errors import DataError
from tunejob.data.tokens import ApproximateCounter
from tunejob.data.validate import KINDS, validate_file

SAMPLE = REPO / "examples" / "data" / "sales_companion.jsonl"


def lines_to_file(tmp_path: Path, rows: list) -> Path:
    p = tmp_path / "d.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def chat(q: str, a: str, system: str | None = "S") -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def test_sample_data_is_clean_and_large_enough():
    report = validate_file(SAMPLE)
    assert report.ok and report.errors == 0 and report.warnings == 0
    assert report.examples >= 100
    st = report.stats["tokens_per_example"]
    assert st["max"] > 3 * st["min"], "the sample should have varied lengths"


def test_each_problem_has_its_line_and_kind(tmp_path):
    rows = [chat(f"q{i}", f"answer number {i}") for i in range(12)]
    rows[3] = {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}
    rows[7] = "{not json"
    rows[9] = {"messages": [{"role": "user", "content": "only a question"}]}
    report = validate_file(lines_to_file(tmp_path, rows))
    where = {(k, p.line) for k, ps in report.problems.items() for p in ps}
    assert ("unrecognized_role", 4) in where
    assert ("invalid_json", 8) in where
    assert ("example_missing_assistant_message", 10) in where
    assert report.examples == 9 and not report.ok


def test_cookbook_message_checks(tmp_path):
    rows = [chat(f"q{i}", f"a{i} is the answer") for i in range(10)] + [
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x y z"}]},
        {"messages": [{"role": "user", "content": "q", "colour": "red"}, {"role": "assistant", "content": "x y z"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x y z"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x y z", "weight": 2}]},
        {"prompt": "p", "completion": "c"},
        {"messages": "not a list"},
        [1, 2],
    ]
    report = validate_file(lines_to_file(tmp_path, rows))
    got = {k: [p.line for p in ps] for k, ps in report.problems.items()}
    assert got["message_missing_key"] == [11]
    assert got["message_unrecognized_key"] == [12]
    assert got["missing_content"] == [13]
    assert got["invalid_weight"] == [14]
    assert got["mixed_formats"] == [15]
    assert got["missing_messages_list"] == [16]
    assert got["data_type"] == [17]


def test_tool_calls_without_content_are_valid(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "crm_lookup", "arguments": "{\"account\": \"Globex\"}"}}
    rows = [chat(f"q{i}", f"a{i} is fine") for i in range(10)] + [
        {"messages": [{"role": "user", "content": "Globex?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "c1", "content": "{\"stage\": \"proposal\"}"},
                      {"role": "assistant", "content": "Globex is at proposal stage."}]}
    ]
    report = validate_file(lines_to_file(tmp_path, rows))
    assert report.ok, report.to_dict()["errors"]


def test_duplicates_blank_lines_and_warnings(tmp_path):
    rows = [chat(f"q{i}", f"a{i} is the answer") for i in range(11)]
    rows.append(rows[2])
    rows.insert(5, "")
    rows.append(chat("no system", "an answer here", system=None))
    rows.append(chat("short", "ok"))
    report = validate_file(lines_to_file(tmp_path, rows), counter=ApproximateCounter())
    got = {k: [p.line for p in ps] for k, ps in report.problems.items()}
    assert got["blank_line"] == [6]
    assert got["duplicate_example"] == [13] and "same as line 3" in report.problems["duplicate_example"][0].message
    assert got["missing_system_message"] == [14]
    assert got["short_assistant_answer"] == [15]
    assert KINDS["missing_system_message"][0] == "warning"


def test_too_few_and_empty(tmp_path):
    report = validate_file(lines_to_file(tmp_path, [chat("q", "a b c d"), chat("q2", "a b c d e")]))
    assert report.counts["too_few_examples"] == 1 and not report.ok
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    assert validate_file(empty).counts["empty_file"] == 1


def test_bedrock_rules(tmp_path):
    good = [chat(f"q{i}", f"a{i} is right") for i in range(10)]
    rows = good + [
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]},
        {"system": "S", "messages": [{"role": "user", "content": "q9"}, {"role": "assistant", "content": "fine answer"}]},
    ]
    path = lines_to_file(tmp_path, rows)
    openai = validate_file(path)  # OpenAI allows any order, but not Bedrock's top-level "system"
    assert [p.line for p in openai.problems["example_unrecognized_key"]] == [14] and openai.errors == 1
    report = validate_file(path, format="bedrock")
    got = {k: [p.line for p in ps] for k, ps in report.problems.items()}
    assert got["bedrock_first_not_user"] == [11]
    assert got["bedrock_last_not_assistant"] == [12]
    assert got["bedrock_not_alternating"] == [13]
    assert 14 not in [p.line for ps in report.problems.values() for p in ps if p.severity == "error"]


def test_json_contract(tmp_path):
    res = run_cli("validate", str(SAMPLE), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ok"] is True and data["examples"] >= 100 and data["errors"] == []
    assert set(data["stats"]) == {"messages_per_example", "tokens_per_example", "assistant_tokens_per_example"}
    bad = lines_to_file(tmp_path, [chat(f"q{i}", "a b c") for i in range(10)] + ["{"])
    res = run_cli("validate", str(bad), "--json")
    assert res.returncode == 2
    data = json.loads(res.stdout)
    assert data["errors"][0]["kind"] == "invalid_json" and data["errors"][0]["problems"][0]["line"] == 11
    assert data["errors"][0]["fix"]


def test_text_output_groups_by_kind_and_ends_with_verdict(tmp_path):
    bad = lines_to_file(tmp_path, [chat(f"q{i}", "a b c") for i in range(10)] + ["{", "[]", "{"])
    res = run_cli("validate", str(bad))
    assert res.returncode == 2
    assert "error invalid_json (2): fix:" in res.stdout
    assert f"{bad}:11:" in res.stdout and f"{bad}:13:" in res.stdout
    assert res.stdout.strip().endswith("FAILED: fix the errors above")


def test_huge_line_is_skipped_in_bounded_memory(tmp_path):
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.write(json.dumps(chat("q", "a b c")).encode() + b"\n")
        f.write(b"x" * (3 * 1024 * 1024) + b"\n")
        f.write(json.dumps(chat("q2", "a b c")).encode() + b"\n")
    got = [(r.number, r.data is None, r.size) for r in iter_raw_lines(p, max_line_bytes=1024 * 1024)]
    assert got[1] == (2, True, 3 * 1024 * 1024) and got[2][:2] == (3, False)


def test_split_is_deterministic_and_disjoint(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", 50)
    t1, v1, n_t, n_v = split_file(data, tmp_path / "a", 0.1, 7)
    t2, v2, *_ = split_file(data, tmp_path / "b", 0.1, 7)
    assert (n_t, n_v) == (45, 5)
    assert t1.read_bytes() == t2.read_bytes() and v1.read_bytes() == v2.read_bytes()
    assert set(t1.read_text().splitlines()).isdisjoint(v1.read_text().splitlines())
    assert sorted(t1.read_text().splitlines() + v1.read_text().splitlines()) == sorted(data.read_text().splitlines())
    _, v3, *_ = split_file(data, tmp_path / "c", 0.1, 8)
    assert v3.read_text() != v1.read_text()
    with pytest.raises(DataError):
        split_examples([1], 0.1, 0)


def test_split_cli(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", 20)
    res = run_cli("split", str(data), "--val-fraction", "0.25")
    assert res.returncode == 0
    assert (tmp_path / "d.train.jsonl").read_text().count("\n") == 15
    assert (tmp_path / "d.val.jsonl").read_text().count("\n") == 5
