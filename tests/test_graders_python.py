"""Python graders: grade(sample, item) in a worker process (tunejob.graders.sandbox), one per
batch, with a time limit per sample, a memory limit, no sockets, a scratch directory that is
removed, and no secrets in its environment; every failure scores 0 with the reason."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from openai_schema import errors
from test_graders import python
from tunejob.graders import GraderContext, grade, grade_many, make_sample, run_grader_response


def test_a_python_grader_scores_a_batch_in_one_worker():
    source = "import os\n\ndef grade(sample, item):\n    return float(os.getpid()) if item.get('pid') else float(sample['output_text'] == item['label'])\n"
    results = grade_many(python(source), [make_sample("a"), make_sample("b"), make_sample("x"), make_sample("y")],
                         [{"label": "a"}, {"label": "a"}, {"pid": 1}, {"pid": 1}])
    assert [r.score for r in results[:2]] == [1.0, 0.0]
    assert results[2].score == results[3].score and results[2].score != os.getpid()  # one worker, not this process


def test_a_grader_that_raises_scores_0_with_the_exceptions_last_line():
    result = grade(python("def grade(sample, item):\n    return 1 / 0\n"), make_sample("a"), {})
    assert result.score == 0.0 and result.error_flags["python_grader_runtime_error"]
    assert result.error_flags["python_grader_runtime_error_details"] == "ZeroDivisionError: division by zero"
    assert errors("RunGraderResponse", run_grader_response(python("def grade(s, i):\n    raise ValueError('bad')\n"), "a", None)) == []


def test_a_hung_sample_is_stopped_and_the_rest_of_the_batch_still_graded():
    source = "import os, time\n\ndef grade(sample, item):\n    if item['hang']:\n        time.sleep(60)\n    return float(os.getpid())\n"
    started = time.monotonic()
    results = grade_many(python(source), [make_sample("x")] * 4, [{"hang": h} for h in (False, True, False, False)],
                         GraderContext(python_timeout_s=1.0))
    assert time.monotonic() - started < 10
    assert results[1].score == 0.0 and "grade took more than 1 s" in results[1].errors[0]
    assert results[1].error_flags["unresponsive_reward_error"] and results[1].error_flags["python_grader_runtime_error"]
    assert results[0].score > 0 and results[2].score > 0 and results[2].score == results[3].score
    assert results[0].score != results[2].score  # the hung worker was killed; a fresh one graded the rest


def test_a_grader_that_allocates_too_much_memory_fails_that_sample_only():
    source = "def grade(sample, item):\n    if item['big']:\n        block = bytearray(2 << 30)\n    return 1.0\n"
    results = grade_many(python(source), [make_sample("x")] * 2, [{"big": True}, {"big": False}], GraderContext(python_memory_mb=256))
    assert results[0].score == 0.0 and results[0].error_flags["python_grader_runtime_error_details"].startswith("MemoryError")
    assert results[1].score == 1.0


@pytest.mark.parametrize("returned,why", [("'0.5'", "returned str '0.5', not a float"), ("True", "returned bool True"),
                                          ("float('nan')", "returned nan, not a finite float"), ("None", "returned NoneType")])
def test_a_grader_must_return_a_finite_number(returned, why):
    result = grade(python(f"def grade(sample, item):\n    return {returned}\n"), make_sample("x"), {})
    assert result.score == 0.0 and why in result.errors[0] and result.error_flags["python_grader_runtime_error"]
    assert grade(python("def grade(sample, item):\n    return 1\n"), make_sample("x"), {}).score == 1.0  # an int is a number


def test_a_grader_has_no_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    source = ("import socket, urllib.request\n\ndef grade(sample, item):\n    score = 0.25\n"
              f"    try:\n        socket.create_connection(('127.0.0.1', {port}), timeout=2)\n        score += 0.5\n    except OSError:\n        pass\n"
              f"    try:\n        urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n        score += 0.25\n    except OSError:\n        pass\n"
              "    return score\n")
    try:
        assert grade(python(source), make_sample("x"), {}).score == 0.25  # both attempts failed; it still returned its score
        with pytest.raises(OSError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()
    plain = grade(python("import socket\n\ndef grade(sample, item):\n    socket.socket()\n    return 1.0\n"), make_sample("x"), {})
    assert plain.score == 0.0 and "network access is disabled" in plain.errors[0]


def test_a_grader_sees_no_secrets_and_works_in_a_scratch_dir_that_is_removed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-of-the-parent")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-secret")
    secrets = "import os\n\ndef grade(sample, item):\n    return float(not any('secret' in v for v in os.environ.values()) and 'OPENAI_API_KEY' not in os.environ)\n"
    assert grade(python(secrets), make_sample("x"), {}).score == 1.0
    where = grade(python("import os\n\ndef grade(sample, item):\n    open('scratch.txt', 'w').write('x')\n    raise RuntimeError(os.getcwd())\n"),
                  make_sample("x"), {})
    cwd = where.error_flags["python_grader_runtime_error_details"].removeprefix("RuntimeError: ")
    assert Path(cwd).name.startswith("tunejob-grader-") and Path(cwd).parent == Path(tempfile.gettempdir())
    assert cwd != os.getcwd() and not Path(cwd).exists()  # removed once the batch was graded


def test_a_grader_whose_module_fails_to_load_fails_every_sample_once():
    results = grade_many(python("import no_such_module_here\n\ndef grade(s, i):\n    return 1.0\n"), [make_sample("x")] * 3, [{}] * 3)
    assert all(r.score == 0.0 and "loading the grader failed: ModuleNotFoundError" in r.errors[0] for r in results)


def test_a_worker_that_dies_fails_its_sample_and_a_new_one_grades_the_rest():
    source = "import os\n\ndef grade(sample, item):\n    if item['die']:\n        os._exit(3)\n    return 1.0\n"
    results = grade_many(python(source), [make_sample("x")] * 3, [{"die": d} for d in (False, True, False)])
    assert [r.score for r in results] == [1.0, 0.0, 1.0] and "ended (exit code 3)" in results[1].errors[0]


def test_image_tag_is_accepted_and_ignored():
    grader = {**python("def grade(sample, item):\n    return 0.5\n"), "image_tag": "2025-05-08"}
    assert grade(grader, make_sample("x"), {}).score == 0.5
