"""Each benchmark script runs end to end at tiny size (the figures come from full runs, not here)."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO


def run_bench(script: str, out, *args: str, timeout: int = 600) -> str:
    """Run bench/SCRIPT with ARGS and --out OUT; fail with its stderr; return what it wrote."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(out)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return out.read_text()


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path, tiny_model):
    report = json.loads(run_bench("train_throughput.py", tmp_path / "r.json", "--model", str(tiny_model), "--train-examples", "8",
                                  "--held-out", "8", "--seeds", "1", "--max-len", "1024",
                                  "--configs", "trl-default-bs1,trl-padding-free,trl-grouped-bf16,tunejob-fp32,tunejob-auto"))
    results = report["results"]
    # bf16 configurations run only where bf16 matmuls are faster than fp32 (AMX / AVX512-BF16)
    assert set(results) | set(report["skipped"]) == {"trl-default-bs1", "trl-padding-free", "trl-grouped-bf16", "tunejob-fp32", "tunejob-auto"}
    assert set(report["skipped"]) <= {"trl-grouped-bf16"}
    # the script's own assert guarantees it; the report must show it: both sides train the same tokens
    assert len({r["trained_tokens"] for r in results.values()}) == 1
    assert results["tunejob-auto"]["precision"] == report["auto_resolves_to"]
    for r in results.values():
        assert r["real_tokens_per_s"]["mean"] > 0 and r["final_valid_loss"]["mean"] > 0 and r["peak_rss_mb"]["mean"] > 0 and 0 < r["mfu"] < 1
    assert report["base_model_valid_loss"] > 0 and report["best_fair_trl"] in results


def test_validate_throughput_smoke(tmp_path):
    r = json.loads(run_bench("validate_throughput.py", tmp_path / "v.json", "--examples", "300", timeout=300))
    assert r["cookbook"]["tokens"] == r["tunejob"]["tokens"] and r["tunejob"]["examples"] == 300


@pytest.mark.slow
def test_serve_latency_smoke(tmp_path, tiny_model):
    r = json.loads(run_bench("serve_latency.py", tmp_path / "s.json", "--model", str(tiny_model), "--requests", "2", "--max-seq-len", "128"))
    assert 0 < r["time_to_first_step_s"] <= r["time_to_first_checkpoint_s"]
    assert r["served"]["n"] == r["direct_generate"]["n"] == 2 and r["same_answer"] is True


@pytest.mark.slow
def test_serve_streams_llama_cpp_smoke(tmp_path, tiny_model):
    """The streams load against the local engine and a --engine llama.cpp row, in one run."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the export extra: make setup / pip install -e .[export]")
    r = json.loads(run_bench("serve_latency.py", tmp_path / "s.json", "--model", str(tiny_model), "--streams", "1,2", "--stream-requests", "1",
                             "--max-tokens", "4", "--llama-cpp", "f32", "--serve-arg=--chat-threads=1"))
    assert r["llama_cpp"]["version"] and "tunejob_serve_llama_cpp_f32" in r
    for name in ("tunejob_serve", "tunejob_serve_llama_cpp_f32"):
        assert [row["streams"] for row in r[name]] == [1, 2] and all(row["requests"] == row["streams"] and not row["failures"] for row in r[name])
        assert all(row["completion_tokens"] == 4 * row["streams"] for row in r[name])


@pytest.mark.slow
def test_serve_load_smoke(tmp_path, tiny_model):
    r = json.loads(run_bench("serve_load.py", tmp_path / "l.json", "--model", str(tiny_model), "--clients", "2", "--seconds", "3",
                             "--max-seq-len", "128", "--stream-tokens", "8", "--chat-tokens", "2"))
    assert r["server_errors_5xx"] == 0 and r["latency"] and set(r["training_tokens_per_s"]) == {"alone", "under_load", "under_load_vs_alone"}


@pytest.mark.slow
def test_profile_step_smoke(tmp_path, tiny_model):
    text = run_bench("profile_step.py", tmp_path / "p.txt", "--model", str(tiny_model), "--steps", "1", "--examples", "16", "--max-len", "128", timeout=300)
    # the phase lines ("forward     1.23   45.6%"); the operator table below names the phases too
    phases = {m[1]: float(m[2]) for m in re.finditer(r"^(forward|backward|optimizer)\s+([\d.]+)\s+[\d.]+%$", text, re.M)}
    assert set(phases) == {"forward", "backward", "optimizer"} and phases["forward"] > 0 and phases["backward"] > 0
    assert "aten::mm" in text  # the operator table is there


@pytest.mark.slow
def test_dpo_throughput_smoke(tmp_path, tiny_model):
    r = json.loads(run_bench("dpo_throughput.py", tmp_path / "d.json", "--model", str(tiny_model), "--steps", "2", "--seeds", "1", "--max-len", "384"))
    # the bf16 rows run where this CPU has bf16 units and are skipped, with the probe's figures, where not
    bf16 = {"trl-bs1-bf16", "tunejob-bf16"}
    ran_bf16 = bf16 & set(r["results"])
    assert set(r["results"]) == {"trl", "trl-bs1", "tunejob"} | ran_bf16 and r["gradient_checkpointing"] is False and r["pairs"] == 8
    assert set(r["skipped"]) == {"trl-padding-free"} | (bf16 - ran_bf16)
    for side in r["results"].values():  # the script itself asserts that every side trained the same tokens
        assert side["seconds_per_1k_pairs"]["mean"] > 0 and side["tokens"] > 0
    assert r["best_trl"] in ("trl", "trl-bs1") + tuple(ran_bf16)


def test_profile_decode_smoke(tmp_path, tiny_model):
    r = json.loads(run_bench("profile_decode.py", tmp_path / "d.json", "--model", str(tiny_model), "--steps", "2", "--threads", "1", timeout=300))
    assert [b["rows"] for b in r["batch"]] == [1, 8] and all(b["tokens_per_s"] > 0 for b in r["batch"])
    assert "aten::mm" in r["batch"][0]["top_ops_self_cpu_share"] and r["weight_read_ms"] > 0 and r["weights_mb"] > 0


def test_profile_decode_llama_cpp_smoke(tmp_path, tiny_model):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the export extra: make setup / pip install -e .[export]")
    r = json.loads(run_bench("profile_decode.py", tmp_path / "d.json", "--model", str(tiny_model), "--steps", "2", "--threads", "1",
                             "--engine", "llama.cpp", "--gguf-type", "f32", timeout=300))
    assert [b["rows"] for b in r["batch"]] == [1, 8] and r["gguf_bytes"] > 0 and r["weight_read_bound_tokens_per_s"] > 0
    for b in r["batch"]:  # the engine's step and llama.cpp's bare step, each timed
        assert b["tokens_per_s"] > 0 and b["llama_cpp_bare_tokens_per_s"] > 0 and b["top_functions_own_time_share"]


@pytest.mark.slow
def test_serve_vs_llama_cpp_smoke(tmp_path, tiny_model):
    """Alternating rounds of llama.cpp itself and serve's llama.cpp engine on one stream, with a system
    message: every round has both sides, each with its tokens/s, and the prompt is counted."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the export extra: make setup / pip install -e .[export]")
    r = json.loads(run_bench("serve_vs_llama_cpp.py", tmp_path / "v.json", "--model", str(tiny_model), "--kind", "f32", "--rounds", "2",
                             "--requests", "1", "--max-tokens", "4", "--system-words", "50"))
    assert [sorted(x) for x in r["rounds"]] == [["itself", "ratio", "serve", "serve_ttft_p50_s"]] * 2
    assert all(x["serve"] > 0 and x["itself"] > 0 for x in r["rounds"]) and r["prompt_tokens"] > 50
    assert r["median_ratio"] > 0 and len(r["weight_read_bound_tokens_per_s"]) == 2
