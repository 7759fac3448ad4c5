"""Preference pairs (OpenAI's DPO format): validation with line numbers, token counts, split, spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from tunejob.data.dataset import load_examples, split_file
from tunejob.data.preference import encode_pairs
from tunejob.data.validate import require_valid, validate_file
from tunejob.errors import DataError

SYSTEM = {"role": "system", "content": "Answer in French."}


def pair(i: int, good: str | None = None, bad: str | None = None, **extra) -> dict:
    obj = {"input": {"messages": [SYSTEM, {"role": "user", "content": f"Say number {i}"}]},
           "preferred_output": [{"role": "assistant", "content": good or f"Le nombre {i}, voila."}],
           "non_preferred_output": [{"role": "assistant", "content": bad or f"The number {i}, there."}]}
    obj.update(extra)
    return obj


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_clean_preference_file_is_recognised_and_counts_both_sides(tmp_path):
    path = write(tmp_path / "p.jsonl", [pair(i) for i in range(12)])
    report = validate_file(path)
    assert report.ok and report.examples == 12 and report.data_kind == "preference"
    assert validate_file(path, format="preference").ok
    # tokens of a pair = both conversations (cookbook arithmetic, checked against the chat file of each side)
    sides = write(tmp_path / "c.jsonl", [{"messages": p["input"]["messages"] + p[k]} for p in [pair(0)] for k in ("preferred_output", "non_preferred_output")])
    side_totals = validate_file(sides, min_examples=1).stats["tokens_per_example"]["total"]
    one = validate_file(write(tmp_path / "one.jsonl", [pair(0)]), min_examples=1)
    assert one.stats["tokens_per_example"]["total"] == side_totals


def test_every_preference_error_has_its_line_and_fix(tmp_path):
    rows = [pair(i) for i in range(12)]
    rows[1] = {k: v for k, v in pair(1).items() if k != "non_preferred_output"}                       # line 2
    rows[2] = pair(2, preferred_output=[])                                                             # line 3
    rows[3] = pair(3, good="Same.", bad="Same.")                                                      # line 4
    rows[4] = pair(4, non_preferred_output=[{"role": "user", "content": "x"}])                         # line 5
    rows[5] = pair(5, input={"messages": [SYSTEM, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})  # line 6
    rows[6] = pair(0)                                                                                  # line 7: duplicate of line 1
    rows[7] = pair(7, extra_key=1)                                                                     # line 8
    rows[8] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}    # line 9: a chat line
    report = validate_file(write(tmp_path / "p.jsonl", rows))
    where = {k: [p.line for p in ps] for k, ps in report.problems.items()}
    assert where["preference_missing_output"] == [2, 3]
    assert where["preference_identical_outputs"] == [4]
    assert where["preference_output_not_assistant"] == [5]
    assert where["preference_input_ends_with_assistant"] == [6]
    assert where["duplicate_example"] == [7]
    assert where["preference_unrecognized_key"] == [8]
    assert where["mixed_formats"] == [9]
    res = run_cli("validate", str(tmp_path / "p.jsonl"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{tmp_path / 'p.jsonl'}:4: preferred_output and non_preferred_output are the same" in res.stdout
    assert "fix: make the non-preferred output differ" in res.stdout


def test_format_preference_refuses_chat_lines(tmp_path):
    chat = write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(12)])
    report = validate_file(chat, format="preference")
    assert report.counts["not_preference"] == 12 and report.problems["not_preference"][0].line == 1
    res = run_cli("validate", str(chat), "--format", "preference", "--json")
    assert res.returncode == 2 and {"kind": "not_preference", "count": 12} in [{k: e[k] for k in ("kind", "count")} for e in json.loads(res.stdout)["errors"]]


def test_method_and_data_kind_must_agree(tmp_path):
    pairs = write(tmp_path / "p.jsonl", [pair(i) for i in range(12)])
    chat = write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(12)])
    require_valid(pairs, method="dpo")
    with pytest.raises(DataError, match="set method: {type: dpo}"):
        require_valid(pairs, method="supervised")
    with pytest.raises(DataError, match="method dpo trains on preference pairs"):
        require_valid(chat, method="dpo")


def test_split_keeps_pairs_verbatim(tmp_path):
    path = write(tmp_path / "p.jsonl", [pair(i) for i in range(20)])
    train, val, n_train, n_val = split_file(path, val_fraction=0.2)
    assert (n_train, n_val) == (16, 4)
    assert validate_file(train).data_kind == "preference" and validate_file(val, min_examples=1).ok
    assert sorted(map(json.dumps, load_examples(train) + load_examples(val))) == sorted(map(json.dumps, load_examples(path)))


def test_pair_labels_cover_the_outputs_only(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    multi = pair(1, input={"messages": [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Salut."},
                                       {"role": "user", "content": "Say number 1"}]})
    [seq], stats = encode_pairs(tok, [multi], 256)
    for side, key in ((seq.chosen, "preferred_output"), (seq.rejected, "non_preferred_output")):
        trained = tok.decode([t for t in side.labels if t != -100])
        assert trained.startswith(multi[key][0]["content"]) and "Salut" not in trained
    assert stats.trained_tokens == seq.chosen.trained_tokens + seq.rejected.trained_tokens
