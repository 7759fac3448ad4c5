"""The web dashboard of `tunejob serve`, driven in headless Chromium (Debian's, via Playwright).

CI needs: apt-get install -y chromium; pip install -e '.[serve,test]' (playwright, no `playwright install`).
Screenshots land in the test's tmp dir and in /tmp/dashboard-shots/ for review.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import write_chat_data
from tunejob.monitor.metrics import read_metrics
from test_serve import KEY_A, KEY_B, Server, client, wait_status
from tunejob.server.run import free_port, wait_until_up

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/tmp/dashboard-shots")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
if not CHROMIUM.is_file():
    if os.environ.get("CI"):  # .ci/run installs it: a skip there would hide the browser tests
        pytest.fail("/usr/bin/chromium is missing in CI: .ci/run should apt-get install chromium", pytrace=False)
    pytest.skip("/usr/bin/chromium is missing: apt-get install -y chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def server(tmp_path, tiny_model):
    s = Server(tmp_path / "data", tiny_model).start()
    yield s
    s.stop()


def base(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


def shot(page, tmp_path: Path, name: str) -> None:
    out = tmp_path / "shots" / f"{name}.png"
    out.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    SHOTS.mkdir(exist_ok=True)
    shutil.copy(out, SHOTS / out.name)


def login(browser, server: Server, key: str):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    page.goto(base(server) + "/")
    assert page.url.endswith("/login")  # unauthenticated pages redirect to the login form
    page.fill("input[name=key]", key)
    page.click("button:has-text('Log in')")
    page.wait_for_url(base(server) + "/")
    return ctx, page


def points(page) -> int:
    return page.evaluate("tjPointCount('chart')")


def test_dashboard_pages(browser, server, tmp_path):
    c = client(server)
    train = write_chat_data(tmp_path / "train.jsonl", 64)
    f = c.files.create(file=open(train, "rb"), purpose="fine-tune")
    # batch 1, 50 epochs: 2,900 steps, far longer than the test watches (it cancels the job); an eval every 8 steps.
    # Early stopping off: with it, two noisy evaluations (bf16, where `auto` picks it) could end the job before the
    # page opens, and a finished job's page draws once and never polls (CI failed that way, once).
    job = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 50, "batch_size": 1},
                                    extra_body={"tunejob": {"lora": {"r": 4}, "checkpointing": {
                                        "eval_steps": 8, "save_steps": 8, "early_stopping_patience": None}}})
    wait_status(c, job.id, ("running",), timeout=120)

    ctx, page = login(browser, server, KEY_A)
    cookie = next(ck for ck in ctx.cookies() if ck["name"] == "tunejob_session")
    assert cookie["httpOnly"] and KEY_A not in cookie["value"]
    row = page.locator(f"#jobs tr:has-text('{job.id}')")
    assert "local" in row.inner_text() and "running" in row.inner_text()
    shot(page, tmp_path, "1-jobs")

    page.click(f"#jobs a:has-text('{job.id}')")
    page.wait_for_url(f"**/jobs/{job.id}")
    page.wait_for_function("tjPointCount('chart') > 0", timeout=120_000)
    before = points(page)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "running", [e.message for e in c.fine_tuning.jobs.list_events(job.id)]
    page.wait_for_function(f"tjPointCount('chart') > {before}", timeout=120_000)  # the page polls; no reload
    assert points(page) > before
    # the diagnosis and the checkpoints fill in while the job trains, without a reload
    page.wait_for_selector("#verdict", timeout=120_000)
    page.wait_for_function("document.querySelectorAll('#checkpoints tbody tr').length >= 1", timeout=120_000)
    assert page.locator("#status").inner_text() == "running"
    assert page.locator("#verdict").inner_text().startswith("Verdict: ")
    shot(page, tmp_path, "2-job-running")

    # cancel: the page's next poll shows the final state, then it stops polling
    c.fine_tuning.jobs.cancel(job.id)
    wait_status(c, job.id, ("cancelled",), timeout=60)
    page.wait_for_function("document.getElementById('status').textContent === 'cancelled'", timeout=30_000)
    assert page.locator("#checkpoints tbody tr").count() >= 1
    assert "training examples" in page.locator("#data").inner_text()
    page.locator("#diagnosis").scroll_into_view_if_needed()
    shot(page, tmp_path, "3-job-diagnosis")

    # chat with a checkpoint through the dashboard (same code path as /v1/chat/completions)
    page.locator("#checkpoints tbody tr").first.locator("input[name=message]").fill("alpha beta")
    page.locator("#checkpoints tbody tr").first.locator("button").click()
    page.wait_for_selector("#answer", timeout=120_000)
    shot(page, tmp_path, "4-chat")

    # upload a broken dataset: line-numbered errors
    bad = tmp_path / "bad.jsonl"
    good_line = train.read_text().splitlines()[0]
    bad.write_text("\n".join([good_line, "{not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), good_line]) + "\n")
    page.goto(base(server) + "/upload")
    page.set_input_files("input[name=file]", str(bad))
    page.click("button:has-text('Validate')")
    page.wait_for_selector("#problems")
    text = page.locator("#problems").inner_text()
    assert "line 2" in text and "line 3" in text
    assert "3 error(s)" in page.locator("#summary").inner_text()  # line 4 repeats line 1: a duplicate
    shot(page, tmp_path, "5-upload-errors")

    # compare two jobs' validation curves: the cancelled one with a second short one
    job2 = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 1, "batch_size": 4},
                                     extra_body={"tunejob": {"lora": {"r": 4}, "checkpointing": {"eval_steps": 4, "save_steps": 4}}})
    wait_status(c, job2.id, ("succeeded", "failed"), timeout=300)
    page.goto(base(server) + f"/compare?a={job.id}&b={job2.id}")
    page.wait_for_function("tjPointCount('chart') > 2")
    assert page.evaluate("document.getElementById('chart').data.length") == 2
    shot(page, tmp_path, "6-compare")
    ctx.close()

    # key B's session does not list key A's jobs, nor open them
    ctx_b, page_b = login(browser, server, KEY_B)
    assert job.id not in page_b.content()
    assert page_b.goto(base(server) + f"/jobs/{job.id}").status == 404
    assert page_b.request.get(base(server) + f"/jobs/{job.id}/metrics.json").status == 404
    page_b.goto(base(server) + "/")
    assert job.id not in page_b.content() and job2.id not in page_b.content()
    shot(page_b, tmp_path, "7-key-b-jobs")
    ctx_b.close()

    # keys never reach the database or the log
    for path in [*(server.data_dir.rglob("*.sqlite3*")), server.log]:
        data = path.read_bytes()
        assert KEY_A.encode() not in data and KEY_B.encode() not in data, path


def test_wrong_key_cannot_log_in(browser, server, tmp_path):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(base(server) + "/login")
    page.fill("input[name=key]", "sk-not-a-key-0000")
    page.click("button:has-text('Log in')")
    page.wait_for_selector("#login-error")
    shot(page, tmp_path, "0-wrong-key")
    assert not [ck for ck in ctx.cookies() if ck["name"] == "tunejob_session"]
    page.goto(base(server) + "/")
    assert page.url.endswith("/login")
    ctx.close()
    # JSON endpoints answer 401, not a redirect
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base(server) + "/jobs/ftjob-x/metrics.json")
    assert err.value.code == 401


def test_plotly_is_served_from_the_package(server):
    body = urllib.request.urlopen(base(server) + "/static/plotly.min.js").read(4096)
    assert b"plotly.js" in body
    page = urllib.request.urlopen(base(server) + "/login").read().decode()
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def test_local_dashboard_over_run_directories(browser, tmp_path, tiny_model):
    """`tunejob dashboard RUN_DIR RUN_DIR`: a finished run with an early stop, and a second run to compare."""
    from conftest import run_cli
    from test_train import random_pairs, write_spec

    runs = []
    for name, seed in (("overfit", 1), ("other", 3)):
        train, val = random_pairs(tmp_path / f"{name}-t.jsonl", 16, seed=seed), random_pairs(tmp_path / f"{name}-v.jsonl", 8, seed=seed + 1)
        spec = write_spec(tmp_path / f"{name}.yaml", tiny_model, train, tmp_path / name,
                          # fp32 pinned: this overfitting curve was tuned on it (bf16, where `auto` picks it, bends it)
                          "hyperparameters: {epochs: 40, batch_size: 4, learning_rate: 0.01, max_seq_len: 64, warmup: 0, mixed_precision: 'no'}\n"
                          "lora: {r: 16, target_modules: all-linear, dropout: 0}\n"
                          "checkpointing: {eval_steps: 8, save_steps: 8, early_stopping_patience: 2}\n", validation=val)
        res = run_cli("run", str(spec))
        assert res.returncode == 0, res.stderr
        runs.append((tmp_path / name, json.loads(res.stdout)))
    (run, summary), _ = runs
    assert summary["stop_reason"] == "early_stopping"

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tunejob", "dashboard", str(runs[0][0]), str(runs[1][0]), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url + "/", proc)
        ctx = browser.new_context(viewport={"width": 1200, "height": 900})
        page = ctx.new_page()
        page.goto(url + "/")  # no login for local runs
        row = page.locator("#jobs tr:has-text('overfit')")
        assert "succeeded (early stop)" in row.inner_text() and f"{summary['steps']} / {summary['total_steps']}" in row.inner_text()
        shot(page, tmp_path, "8-local-runs")

        page.click("#jobs a:has-text('overfit')")
        page.wait_for_url("**/jobs/overfit")  # the click navigates: wait for the job page before asking it
        page.wait_for_function("tjPointCount('chart') > 0")
        trains = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
        evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
        assert points(page) == len(trains) + len(evals) + 1  # + the best-checkpoint star
        assert page.evaluate("document.getElementById('chart').layout.shapes[0].x0") == summary["steps"]  # the early stop line
        assert page.locator("#verdict").inner_text() == "Verdict: overfitting"
        assert f"{summary['best_step']} ★ best" in page.locator("#checkpoints").inner_text()
        shot(page, tmp_path, "9-local-run")

        best = page.locator("#checkpoints tbody tr:has-text('★ best')")
        best.locator("input[name=message]").fill("alpha beta")
        best.locator("button").click()
        page.wait_for_selector("#answer", timeout=120_000)

        page.goto(url + "/compare?a=overfit&b=other")
        page.wait_for_function("tjPointCount('chart') > 2")
        assert page.evaluate("document.getElementById('chart').data.length") == 2
        shot(page, tmp_path, "10-local-compare")
        ctx.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_local_dashboard_refuses_a_directory_that_is_not_a_run(tmp_path):
    from conftest import run_cli

    res = run_cli("dashboard", str(tmp_path))
    assert res.returncode == 2 and "not a run directory" in res.stderr and "Traceback" not in res.stderr
