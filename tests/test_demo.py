"""`tunejob demo` proves learning with facts only its training data holds, and `tunejob eval
--facts` on the same run reports the same score (same greedy decoding, same model)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from tunejob.demo import demo_facts_path, demo_spec_path


def test_demo_facts_are_trained_held_out_and_asked_in_new_words():
    """Each fact is stated by several training answers; validation holds other paraphrases of it
    (so the best checkpoint follows the facts) but none of the training examples; the demo's own
    question is in neither file."""
    from tunejob.evaluate.facts import load_facts
    from tunejob.spec import load_spec

    spec = load_spec(demo_spec_path())
    facts = load_facts(demo_facts_path())
    train = [json.loads(line) for line in spec.data.train.read_text().splitlines()]
    validation = [json.loads(line) for line in spec.data.validation.read_text().splitlines()]
    assert not {json.dumps(e) for e in validation} & {json.dumps(e) for e in train}
    for fact in facts:
        def stating(rows):
            return [r for r in rows if any(e in m["content"] for e in fact.expect for m in r["messages"] if m["role"] == "assistant")]

        assert len(stating(train)) >= 5, f"{fact.expect}: stated by {len(stating(train))} training answers"
        assert 1 <= len(stating(validation)) < len(stating(train)), f"{fact.expect}: held-out paraphrases"
        asked = [m["content"] for r in train + validation for m in r["messages"] if m["role"] == "user"]
        assert fact.question not in asked  # asked in new words


def test_facts_file_errors_name_the_line(tmp_path):
    from tunejob.errors import DataError
    from tunejob.evaluate.facts import Fact, is_right, load_facts

    bad = tmp_path / "f.jsonl"
    bad.write_text('{"question": "q", "expect": "x"}\n{"question": "no expect"}\n')
    with pytest.raises(DataError, match=r"f.jsonl:2: a fact is"):
        load_facts(bad)
    assert is_right("It is Dan WHITAKER.", Fact("q", ("Whitaker",))) and not is_right("Dan", Fact("q", ("Whitaker",)))


def test_demo_end_to_end_then_eval_reports_the_same_fact_score(tmp_path, tiny_model):
    out = tmp_path / "demo"
    res = run_cli("demo", "--output-dir", str(out), "--set", f"model={tiny_model}", "--set", "hyperparameters.max_steps=2",
                  "--set", "hyperparameters.max_seq_len=128", "--set", "checkpointing.eval_steps=2", "--set", "checkpointing.save_steps=2", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "demo.json").read_text()) == json.loads(res.stdout)  # the file, and stdout only with --json
    demo = json.loads(res.stdout)["facts"]
    assert demo["facts"] == 4 and len(demo["rows"]) == 4
    assert "Verdict: " in res.stderr and f"tunejob eval {out} --facts" in res.stderr and "tunejob export" in res.stderr
    ev = run_cli("eval", str(out), "--facts", str(demo_facts_path()), "--limit", "1", "--max-new-tokens", "4", "--json")
    assert ev.returncode == 0, ev.stderr
    facts = json.loads(ev.stdout)["facts"]
    assert (facts["base_right"], facts["finetuned_right"]) == (demo["base_right"], demo["finetuned_right"])
    assert [r["finetuned"]["answer"] for r in facts["rows"]] == [r["finetuned"]["answer"] for r in demo["rows"]]
