"""`tunejob validate` against a corpus of malformed datasets (tests/data/bad/).

Each file is named after what is wrong with it; EXPECTED.json says which problem kind it must
report, at which line (null for file-level kinds), and with which extra CLI arguments. The files
are regenerated, byte for byte, by tests/data/bad/_generate.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunejob.data.validate import KINDS

BAD = Path(__file__).resolve().parent / "data" / "bad"
EXPECTED: dict[str, dict] = json.loads((BAD / "EXPECTED.json").read_text(encoding="utf-8"))
NOT_IN_CORPUS = {"line_too_long"}  # generated on the fly below: a 20 MB file does not belong in git
# The preference-pair kinds (DPO data) are covered line by line in tests/test_preference_data.py;
# this corpus is chat data. Adding pair files to it is left to do.
NOT_IN_CORPUS |= {"not_preference", "preference_identical_outputs", "preference_input_ends_with_assistant", "preference_missing_input",
                  "preference_missing_output", "preference_output_not_assistant", "preference_unrecognized_key"}

# Validator bugs this corpus found, all fixed: a list-valued role crashed (unhashable), a
# 5000-digit integer raised ValueError past the JSON check, and key names from the file reached
# the text report unescaped (a lone surrogate crashed stdout; ESC sequences reached the terminal).
# Put a case here, with its reason, if the corpus ever finds another; strict xfail then turns the
# fix into an XPASS failure, so a mark cannot outlive its bug.
CRASHES: dict[str, str] = {}
TEXT_MODE_BUGS: dict[str, str] = {}


def _params(bugs: dict[str, str]) -> list:
    return [pytest.param(name, id=name, marks=pytest.mark.xfail(reason=bugs[name], strict=True) if name in bugs else ()) for name in sorted(EXPECTED)]


def validate(path: Path, *args: str, as_json: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tunejob", "validate", str(path), *(["--json"] if as_json else []), *args]
    return subprocess.run(cmd, capture_output=True, timeout=120)


def problems_of(report: dict) -> dict[str, list[dict]]:
    return {group["kind"]: group["problems"] for group in report["errors"] + report["warnings"]}


@pytest.mark.parametrize("name", _params(CRASHES))
def test_bad_file_reports_expected_problem(name):
    expected = EXPECTED[name]
    r = validate(BAD / name, *expected["args"])
    stderr = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    assert r.returncode == 2, f"exit {r.returncode}; stderr: {stderr.strip()}"
    report = json.loads(r.stdout)
    found = problems_of(report)
    assert expected["kind"] in found, f"{expected['kind']} not reported; got {sorted(found)}"
    lines = [p["line"] for p in found[expected["kind"]]]
    assert expected["line"] in lines, f"{expected['kind']} reported at lines {lines}, expected {expected['line']}"
    for kind, problems in found.items():
        for p in problems:
            assert isinstance(p["message"], str) and p["message"].strip(), f"empty message for {kind} at line {p['line']}"


@pytest.mark.parametrize("name", _params({**CRASHES, **TEXT_MODE_BUGS}))
def test_bad_file_text_report_is_safe(name):
    """The human report on the same files: exit 2, no crash, printable UTF-8 with no terminal escapes."""
    r = validate(BAD / name, *EXPECTED[name]["args"], as_json=False)
    stderr = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    assert r.returncode == 2, f"exit {r.returncode}; stderr: {stderr.strip()}"
    r.stdout.decode("utf-8")  # strict: raises on bytes that are not UTF-8
    assert b"\x1b" not in r.stdout


def test_corpus_is_large_and_covers_every_error_kind():
    files = {p.name for p in BAD.iterdir() if p.is_file() and p.name != "EXPECTED.json" and not p.name.startswith("_")}
    assert files == set(EXPECTED), f"unlisted: {sorted(files - set(EXPECTED))}; missing: {sorted(set(EXPECTED) - files)}"
    assert len(files) >= 45
    for name in files:
        size = (BAD / name).stat().st_size
        assert size < (100_000 if name.startswith("too_many_tokens") else 10_000), f"{name} is {size} bytes"
    error_kinds = {k for k, (severity, _) in KINDS.items() if severity == "error"}
    covered = {e["kind"] for e in EXPECTED.values()}
    assert covered <= set(KINDS), f"unknown kinds in EXPECTED.json: {sorted(covered - set(KINDS))}"
    assert error_kinds - NOT_IN_CORPUS <= covered, f"not covered: {sorted(error_kinds - NOT_IN_CORPUS - covered)}"
    for name, e in EXPECTED.items():
        assert set(e) == {"kind", "line", "args"} and (e["line"] is None or e["line"] >= 1), name
    assert sum(1 for e in EXPECTED.values() if e["line"] not in (None, 1)) > len(EXPECTED) // 2, "most bad lines should come after valid ones"


def test_line_too_long_is_reported_at_its_line(tmp_path):
    ex = lambda i: json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"The answer to question {i}."}]})
    path = tmp_path / "long_line.jsonl"
    filler = "x" * (20 * 1024 * 1024)
    path.write_text(ex(1) + "\n" + ex(2) + "\n" + '{"messages": [{"role": "user", "content": "' + filler + '"}]}\n' + ex(4) + "\n")
    r = validate(path)
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    found = problems_of(json.loads(r.stdout))
    assert [p["line"] for p in found["line_too_long"]] == [3]
    assert found["line_too_long"][0]["message"].strip()


@pytest.mark.parametrize("target", ["directory", "missing"])
def test_unreadable_path_is_one_line_error(tmp_path, target):
    path = tmp_path if target == "directory" else tmp_path / "no_such_file.jsonl"
    r = validate(path)
    stderr = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert str(path) in stderr
