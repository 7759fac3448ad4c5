"""`tunejob eval`: answer metrics and judge statistics by hand, the judge client against a real
local HTTP server, and base vs fine-tuned on a tiny run trained on its own held-out answers."""

from __future__ import annotations

import io
import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import run_cli, write_chat_data
from tunejob.evaluate import evaluation as ev
from tunejob.evaluate import judge as jd
from tunejob.monitor.metrics import read_metrics

# ---------------------------------------------------------------- answer metrics


@pytest.mark.parametrize("text, want", [
    ("The Cat, sat!", "cat sat"),
    ("  an  apple a day ", "apple day"),
    ("Theater", "theater"),  # articles only as whole words
])
def test_normalize_answer_is_squads(text, want):
    assert ev.normalize_answer(text) == want


@pytest.mark.parametrize("pred, ref, em, f1", [
    ("The cat.", "cat", 1.0, 1.0),
    ("the cat sat on the mat", "a cat on a mat", 0.0, 6 / 7),  # P 3/4, R 3/3
    ("pi pi pi", "pi nu", 0.0, 0.4),  # a bag: one "pi" in common -> P 1/3, R 1/2
    ("alpha", "beta", 0.0, 0.0),
    ("", "", 1.0, 1.0),
    ("", "beta", 0.0, 0.0),
])
def test_exact_match_and_token_f1(pred, ref, em, f1):
    assert ev.exact_match(pred, ref) == em
    assert ev.token_f1(pred, ref) == pytest.approx(f1)


@pytest.mark.parametrize("pred, ref, want", [
    ("the cat sat on the mat", "the cat on the mat", 10 / 11),  # LCS 5: P 5/6, R 5/5
    ("PI NU KAPPA", "KAPPA PI NU MU", 4 / 7),  # LCS "pi nu": P 2/3, R 2/4
    ("alpha beta", "alpha beta", 1.0),
    ("alpha", "beta", 0.0),
])
def test_rouge_l_is_the_lcs_f_measure(pred, ref, want):
    assert ev.rouge_l(pred, ref) == pytest.approx(want)


def test_prompt_is_everything_before_the_last_assistant_message():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": [{"type": "text", "text": "a2"}], "weight": 1}]
    prompt, reference = ev.prompt_and_reference(msgs)
    assert reference == "a2"
    assert prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert ev.prompt_and_reference([{"role": "user", "content": "q"}]) is None


def test_cost_per_1k_queries_uses_each_models_prices_and_answer_length():
    # gpt-4o-mini: base $0.15 / $0.60, fine-tuned $0.30 / $1.20 per 1M input / output tokens.
    # base: 1,000 x (100 x 0.15 + 50 x 0.60) / 1e6 = 0.045; fine-tuned: 1,000 x (100 x 0.30 + 20 x 1.20) / 1e6 = 0.054
    got = ev.cost_per_1k_queries("gpt-4o-mini", 100, {"base": 50, "finetuned": 20})
    assert got["base"] == pytest.approx(0.045) and got["finetuned"] == pytest.approx(0.054)
    assert "OpenAI" in got["source"]
    assert ev.cost_per_1k_queries("default", 100, {"base": 50, "finetuned": 20}) is None


# ---------------------------------------------------------------- judge statistics


def test_wilson_interval_by_hand():
    lo, hi = jd.wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert jd.wilson_interval(0, 10)[0] == 0.0 and jd.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert jd.wilson_interval(5, 10) == (pytest.approx(1 - jd.wilson_interval(5, 10)[1]), pytest.approx(1 - jd.wilson_interval(5, 10)[0]))
    assert jd.wilson_interval(0, 0) == (0.0, 1.0)


def test_positions_are_seeded_and_balanced():
    a = jd.positions(200, seed=7)
    assert a == jd.positions(200, seed=7) and a != jd.positions(200, seed=8)
    assert 70 < sum(a) < 130


@pytest.mark.parametrize("reply, want", [
    ('{"winner": "A", "reason": "closer to the reference"}', "A"),
    ('Verdict:\n{"winner": "tie", "reason": "same"}', "tie"),
    ("b", "B"),
    ('{"winner": "C"}', None),
    ("I cannot decide", None),
])
def test_parse_verdict(reply, want):
    assert jd.parse_verdict(reply) == want


def test_outcome_undoes_the_shown_order_and_tally_counts_ties_as_half():
    assert [jd.outcome("A", True), jd.outcome("A", False), jd.outcome("B", False), jd.outcome("tie", True), jd.outcome(None, True)] == [
        "finetuned", "base", "finetuned", "tie", None]
    t = jd.tally(["finetuned", "finetuned", "base", "tie", None])
    assert (t["wins"], t["losses"], t["ties"], t["unparsed"], t["judged"]) == (2, 1, 1, 1, 4)
    assert t["win_rate"] == pytest.approx(2.5 / 4) and t["ci95"] == list(jd.wilson_interval(2.5, 4))
    assert jd.tally([])["win_rate"] is None


def test_judge_messages_show_the_answers_in_the_drawn_order():
    pair = jd.PairToJudge([{"role": "user", "content": "q?"}], "ref", "BASE ANSWER", "TUNED ANSWER")
    user = jd.judge_messages(pair, finetuned_is_a=False)[1]["content"]
    assert "user: q?" in user and "Reference answer:\nref" in user
    assert user.index("Answer A:\nBASE ANSWER") < user.index("Answer B:\nTUNED ANSWER")


# ---------------------------------------------------------------- judge client vs a real local server


@pytest.fixture(scope="module")
def judge_server():
    """An OpenAI-compatible /v1/chat/completions that always answers {"winner": "A"}."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
                return
            seen.append({"body": body, "auth": self.headers.get("Authorization")})
            self._send(200, {
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": '{"winner": "A", "reason": "A matches the reference"}'}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
            })

        def _send(self, code, payload):
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def _pairs(n: int) -> list[jd.PairToJudge]:
    return [jd.PairToJudge([{"role": "user", "content": f"q{i}"}], f"r{i}", f"base {i}", f"tuned {i}") for i in range(n)]


def test_judge_client_against_a_local_server(judge_server, monkeypatch):
    url, seen = judge_server
    seen.clear()
    monkeypatch.setenv("JUDGE_KEY", "k-123")
    settings = jd.JudgeSettings(f"{url}/v1", "judge-model", api_key_env="JUDGE_KEY", seed=3)
    result = jd.judge_pairs(settings, _pairs(8))
    order = jd.positions(8, seed=3)
    # The server always prefers A, so the fine-tuned model wins exactly where it was shown first.
    assert result["wins"] == sum(order) and result["losses"] == 8 - sum(order) and result["judged"] == 8
    assert [v["finetuned_shown_as"] == "A" for v in result["verdicts"]] == order
    assert len(seen) == 8 and all(r["auth"] == "Bearer k-123" for r in seen)
    body = seen[0]["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert body["messages"][0]["content"] == jd.RUBRIC and "q0" in body["messages"][1]["content"]


def test_judge_errors_are_clear(judge_server, monkeypatch):
    url, _ = judge_server
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(jd.JudgeError, match="NO_SUCH_KEY is not set"):
        jd.make_client(jd.JudgeSettings(url, "m", api_key_env="NO_SUCH_KEY"))
    monkeypatch.setenv("JUDGE_KEY", "k")
    with pytest.raises(jd.JudgeError, match="answered HTTP 404"):
        jd.judge_pairs(jd.JudgeSettings(f"{url}/wrong", "m", api_key_env="JUDGE_KEY"), _pairs(1))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(jd.JudgeError, match="cannot reach"):
        jd.judge_pairs(jd.JudgeSettings(f"http://127.0.0.1:{port}/v1", "m", api_key_env="JUDGE_KEY", timeout_s=5), _pairs(1))


# ---------------------------------------------------------------- base vs fine-tuned, end to end


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_model, judge_server):
    """A tiny run trained (high LR, many epochs) on the very examples it is evaluated on, then
    `tunejob eval` with the local judge."""
    tmp = tmp_path_factory.mktemp("eval")
    data = write_chat_data(tmp / "d.jsonl", 8)
    out = tmp / "run"
    (tmp / "job.yaml").write_text(
        f"model: {tiny_model}\ndata: {{train: {data}, validation: {data}}}\noutput_dir: {out}\n"
        "hyperparameters: {epochs: 10, batch_size: 4, learning_rate: 0.01, max_seq_len: 64, warmup: 0}\n"
        "lora: {r: 16, target_modules: all-linear, dropout: 0}\n"
        "checkpointing: {eval_steps: 10, save_steps: 10, early_stopping_patience: null}\n"
    )
    res = run_cli("run", str(tmp / "job.yaml"))
    assert res.returncode == 0, res.stderr
    url, _ = judge_server
    res = run_cli("eval", str(out), "--max-new-tokens", "16", "--limit", "4", "--json",
                  "--judge-base-url", f"{url}/v1", "--judge-model", "judge-model", env={"OPENAI_API_KEY": "test-key"})
    assert res.returncode == 0, res.stderr
    return out, json.loads(res.stdout)


def test_eval_loss_equals_trainings_eval_of_the_best_checkpoint(evaluated_run):
    out, result = evaluated_run
    assert result == json.loads((out / "eval.json").read_text())
    best = json.loads((out / "summary.json").read_text())["best_step"]
    record = next(r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval" and r["step"] == best)
    tuned = result["models"]["finetuned"]
    assert result["step"] == best and Path(result["checkpoint"]).name == f"step-{best:06d}"
    assert abs(tuned["loss"] - record["valid_loss"]) < 1e-4
    assert tuned["mean_token_accuracy"] == pytest.approx(record["valid_mean_token_accuracy"])
    for side in ("base", "finetuned"):
        assert result["models"][side]["perplexity"] == pytest.approx(math.exp(result["models"][side]["loss"]))


def test_fine_tuned_beats_its_base_on_the_answers_it_learned(evaluated_run):
    _, result = evaluated_run
    base, tuned = result["models"]["base"], result["models"]["finetuned"]
    assert tuned["loss"] < base["loss"]
    assert tuned["f1"] >= base["f1"] and tuned["rouge_l"] >= base["rouge_l"]
    assert result["examples"] == 8 and result["answered"] == 4 and len(result["answers"]) == 4
    for row in result["answers"]:
        assert row["reference"] == row["prompt"][-1]["content"].upper()  # the echo data's answer
        for side in ("base", "finetuned"):
            cell = row[side]
            assert cell["f1"] == pytest.approx(ev.token_f1(cell["answer"], row["reference"]))
            assert cell["rouge_l"] == pytest.approx(ev.rouge_l(cell["answer"], row["reference"]))
            assert cell["seconds"] > 0 and cell["tokens"] >= 0
    assert tuned["f1"] == pytest.approx(sum(r["finetuned"]["f1"] for r in result["answers"]) / 4)
    # A local model has no per-query price: compute is reported instead.
    assert result["cost_per_1k_queries_usd"] is None and result["compute"]["finetuned"]["tokens_per_second"] > 0


def test_eval_judge_tally_and_report_section(evaluated_run):
    out, result = evaluated_run
    judge = result["judge"]
    assert judge["judged"] == 4 and judge["model"] == "judge-model"
    assert judge["wins"] == sum(v["finetuned_shown_as"] == "A" for v in judge["verdicts"])
    res = run_cli("report", str(out))
    assert res.returncode == 0, res.stderr
    page = (out / "report.html").read_text()
    assert "Evaluation: base vs fine-tuned" in page and "id='eval-judge'" in page
    blob = json.loads(page.split('<script type="application/json" id="tunejob-data">')[1].split("</script>")[0])
    assert blob["evaluation"]["models"]["finetuned"]["loss"] == result["models"]["finetuned"]["loss"]


def test_render_prints_metrics_answers_and_judge(evaluated_run):
    from rich.console import Console

    _, result = evaluated_run
    buf = io.StringIO()
    ev.render(result, Console(file=buf, width=160))
    text = buf.getvalue()
    for needle in ("token F1", "ROUGE-L", "perplexity", "tokens / s", "fine-tuned", result["answers"][0]["reference"], "win rate"):
        assert needle in text


def test_eval_errors_are_clear(tmp_path, evaluated_run):
    out, _ = evaluated_run
    with pytest.raises(ev.ModelError, match="no config.yaml"):
        ev.evaluate_run(tmp_path)
    with pytest.raises(ev.DataError, match="--limit must be at least 1"):
        ev.evaluate_run(out, limit=0)
    res = run_cli("eval", str(out), "--judge-model", "m")
    assert res.returncode == 2 and "--judge-base-url and --judge-model" in res.stderr and "Traceback" not in res.stderr


def test_held_out_is_the_runs_validation_split_or_the_data_given(tmp_path, evaluated_run):
    from tunejob.data.dataset import load_examples
    from tunejob.data.splits import load_splits

    out, _ = evaluated_run
    spec = ev.load_run_spec(out)
    assert ev.held_out_examples(spec, None) == load_splits(spec)[1] == load_examples(spec.data.validation)
    other = write_chat_data(tmp_path / "other.jsonl", 3, seed=5)
    assert ev.held_out_examples(spec, other) == load_examples(other)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\nnot json\n')
    with pytest.raises(ev.DataError, match="bad.jsonl:2"):
        ev.held_out_examples(spec, bad)
    gone = spec.model_copy(update={"data": spec.data.model_copy(update={"validation": tmp_path / "gone.jsonl"})})
    with pytest.raises(ev.DataError, match="pass --data"):
        ev.held_out_examples(gone, None)
