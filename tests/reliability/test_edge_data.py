"""Degenerate data through `tunejob run` on the tiny model (issue 10, part 6): an empty validation
file, a dataset of one example, and a validation split that keeps no trainable example. Each ends
before training with one `error:` line naming the file or the fix, exit code 2 (TunejobError's),
no traceback and no checkpoint.

NaN loss, the third case of the issue, is tests/test_train.py::test_nan_loss_stops_with_a_clear_message_and_keeps_the_best
(exit 2, "became NaN/inf at step 6", the best checkpoint kept)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli, write_chat_data


def _empty_validation(tmp: Path) -> tuple[str, list[str]]:
    (tmp / "empty.jsonl").write_text("")
    data = write_chat_data(tmp / "d.jsonl", 20)
    return f"{{train: {data}, validation: {tmp / 'empty.jsonl'}}}", [f"{tmp / 'empty.jsonl'}: the file has no examples", "add examples"]


def _one_example(tmp: Path) -> tuple[str, list[str]]:
    data = write_chat_data(tmp / "one.jsonl", 1)
    return f"{{train: {data}, val_fraction: 0.2}}", [str(data), "1 valid example(s); at least 2 are needed", "add examples"]


def _validation_left_empty(tmp: Path) -> tuple[str, list[str]]:
    # A 200-word system prompt fills max_seq_len 64 before the answer starts: every validation
    # example has 0 trained tokens and is dropped, so the split the loss is measured on is empty.
    data = write_chat_data(tmp / "d.jsonl", 20)
    val = write_chat_data(tmp / "v.jsonl", 4, seed=5, system="word " * 200)
    return f"{{train: {data}, validation: {val}}}", ["no trainable examples left in the train or validation split", "max_seq_len"]


@pytest.mark.parametrize("case", [_empty_validation, _one_example, _validation_left_empty], ids=lambda f: f.__name__.strip("_"))
def test_degenerate_data_ends_with_one_clear_error(tmp_path, tiny_model, case):
    data_line, expected = case(tmp_path)
    out = tmp_path / "run"
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: {tiny_model}\ndata: {data_line}\noutput_dir: {out}\n"
                    "hyperparameters: {epochs: 1, batch_size: 4, max_seq_len: 64}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-2000:]
    for part in expected:
        assert part in errors[0], (part, errors[0])
    assert res.stdout == ""  # no summary: nothing ran
    assert not (out / "checkpoints").exists()
    print(f"\n[edge-data] {case.__name__.strip('_')}: exit {res.returncode}: {errors[0]}")
