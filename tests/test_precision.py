"""mixed_precision: 'auto' resolves per machine; bf16 keeps the frozen base in bf16 and the adapter,
optimizer and loss in fp32, and trains to the fp32 run's validation loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_chat_data
from tunejob.errors import SpecError
from tunejob.monitor.metrics import read_metrics
from tunejob.spec import parse_spec
from tunejob.train import precision


def test_explicit_settings_pass_through_and_auto_follows_the_device(monkeypatch):
    assert precision.resolve("no", "cpu") == "no" and precision.resolve("bf16", "cpu") == "bf16"
    if not torch.cuda.is_available():
        assert precision.resolve("auto", "cuda") == "no"  # no GPU here: nothing to be fast on
    # QLoRA on CPU: bitsandbytes' NF4 kernels compute in fp32 (train/adapter.py), whatever the CPU
    assert precision.resolve("auto", "cpu", quantization="4bit") == "no"
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])  # a CPU without bf16 units
    monkeypatch.setattr(precision, "measure_cpu", lambda: pytest.fail("no bf16 flags: nothing to measure"))
    assert precision.resolve("auto", "cpu") == "no"


def test_the_cpu_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    cache = tmp_path / "precision.json"
    first = precision.cached_cpu_probe(["avx512_bf16"], cache)
    assert first["bf16_fast"] == (first["bf16_gflops"] >= precision.BF16_MIN_RATIO * first["fp32_gflops"])
    monkeypatch.setattr(precision, "measure_cpu", lambda: pytest.fail("measured again"))
    assert precision.cached_cpu_probe(["avx512_bf16"], cache) == first
    assert len(json.loads(cache.read_text())) == 1


def test_measuring_the_probe_leaves_a_seeded_runs_generator_where_it_was(tmp_path):
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    precision.cached_cpu_probe(["avx512_bf16"], tmp_path / "precision.json")  # measured: random matrices
    assert torch.equal(torch.rand(4), expected)


def test_a_probe_cached_before_attention_was_timed_is_measured_again(tmp_path, monkeypatch):
    cache = tmp_path / "precision.json"
    key = f"{precision.cpu_model()}|avx512_bf16|torch {torch.__version__}"
    cache.write_text(json.dumps({key: {"fp32_gflops": 90.0, "bf16_gflops": 360.0, "bf16_fast": True, "threads": 2}}))
    fresh = {"fp32_gflops": 91.0, "bf16_gflops": 361.0, "bf16_fast": True, "attention_fp32_up_to": 128}
    monkeypatch.setattr(precision, "measure_cpu", lambda: fresh)
    assert precision.cached_cpu_probe(["avx512_bf16"], cache)["attention_fp32_up_to"] == 128
    assert json.loads(cache.read_text())[key]["bf16_gflops"] == 361.0


def test_attention_runs_in_fp32_up_to_the_longest_length_it_won_from_the_shortest():
    """fp32 must beat bf16 by ATTENTION_MIN_RATIO at every length up to the answer: the first
    length where it does not ends the search (a longer win after it is noise, not a crossover)."""
    ms = {(32, True): 1.0, (32, False): 0.3, (64, True): 1.4, (64, False): 0.5, (128, True): 2.0, (128, False): 1.9,
          (256, True): 4.0, (256, False): 1.0}
    assert precision.attention_fp32_up_to((32, 64, 128, 256), repeats=1) in (0, 32, 64, 128, 256)  # the real timing runs
    with pytest.MonkeyPatch.context() as m:
        m.setattr(precision, "attention_ms", lambda n, bf16, repeats: ms[(n, bf16)])
        assert precision.attention_fp32_up_to((32, 64, 128, 256)) == 64
        assert precision.attention_fp32_up_to((128, 256)) == 0


def test_this_machines_verdict_agrees_with_its_flags_and_its_measurement():
    flags = precision.cpu_bf16_flags()
    fast = precision.bf16_is_fast(torch.device("cpu"))
    if not flags:
        assert fast is False
    else:
        m = precision.measure_cpu()
        # the cached verdict and a fresh measurement agree unless the ratio sits at the threshold
        ratio = m["bf16_gflops"] / m["fp32_gflops"]
        if abs(ratio - precision.BF16_MIN_RATIO) > 0.5:
            assert fast == m["bf16_fast"], (m, fast)


def test_api_backends_accept_auto_and_refuse_bf16():
    default = parse_spec("backend: openai\nmodel: gpt-4o-mini-2024-07-18\ndata: {train: t}\n")
    assert default.hyperparameters.mixed_precision == "auto"  # the default, on every backend
    spec = parse_spec("backend: openai\nmodel: gpt-4o-mini-2024-07-18\ndata: {train: t}\nhyperparameters: {mixed_precision: auto}\n")
    from tunejob.backends.openai_api import request_body

    assert "mixed_precision" not in json.dumps(request_body(spec, "tag", "file-1", None))
    with pytest.raises(SpecError) as err:
        parse_spec("backend: openai\nmodel: gpt-4o-mini-2024-07-18\ndata: {train: t}\nhyperparameters: {mixed_precision: bf16}\n")
    assert "hyperparameters.mixed_precision" in str(err.value) and "auto" in str(err.value)


def test_bf16_stores_the_frozen_base_in_bf16_and_the_adapter_in_fp32(tiny_model):
    from tunejob.train.adapter import add_lora, load_model

    spec = parse_spec(f"model: {tiny_model}\ndata: {{train: t}}\nlora: {{target_modules: all-linear}}\n")
    model = add_lora(spec, load_model(spec, str(tiny_model), torch.device("cpu"), "bf16"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}


def test_a_bf16_adapter_takes_its_input_in_bf16_with_the_same_gradients_as_peft_casting_it(tiny_model):
    """Under bf16 autocast peft's cast of each adapted layer's input up to the fp32 adapter's dtype
    is undone by autocast at once; add_lora switches it off for a bf16 base. The reference is peft's
    own casting: the same loss and LoRA gradients, bit for bit (dropout 0: no RNG either side)."""
    from peft.tuners.lora import LoraLayer
    from tunejob.train.adapter import add_lora, load_model
    from tunejob.train.loss import forward_loss

    spec = parse_spec(f"model: {tiny_model}\ndata: {{train: t}}\nlora: {{target_modules: all-linear, dropout: 0.0}}\n")
    ids = torch.randint(3, 200, (1, 40))
    batch = {"input_ids": ids, "labels": ids}
    results = []
    for peft_casts in (False, True):
        torch.manual_seed(0)
        model = add_lora(spec, load_model(spec, str(tiny_model), torch.device("cpu"), "bf16")).train()
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(m.cast_input_dtype_enabled is False for m in layers)
        for m in layers:
            m.cast_input_dtype_enabled = peft_casts
        with torch.no_grad():  # lora_B starts at 0, which would leave lora_A's gradient 0 either way
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward_loss(model, batch, "full")[0]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (loss, grads), (ref_loss, ref_grads) = results
    assert torch.equal(loss, ref_loss) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert any(g.abs().sum() > 0 for g in grads)
    fp32 = add_lora(spec, load_model(spec, str(tiny_model), torch.device("cpu"), "no"))
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in fp32.modules() if isinstance(m, LoraLayer))


def _final_valid_loss(run: Path) -> float:
    return [r["valid_loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"][-1]


@pytest.mark.slow
def test_bf16_and_auto_train_to_the_fp32_validation_loss(tmp_path, tiny_model):
    """bf16 keeps 8 bits of mantissa: per-step losses differ in the third digit, the curves must not
    part. Final validation loss within 2% of fp32's (lr 0.02 on the tiny model moves the loss from
    ~8.3 to ~3: equal curves are not equal by accident); 'auto' trains in what this machine resolves."""
    data = write_chat_data(tmp_path / "d.jsonl", 32)
    final, summaries = {}, {}
    for mp in ("no", "bf16", "auto"):
        job = tmp_path / f"{mp}.yaml"
        job.write_text(f"model: {tiny_model}\ndata: {{train: {data}, val_fraction: 0.25}}\noutput_dir: {tmp_path / mp}\n"
                       f"hyperparameters: {{epochs: 3, batch_size: 4, learning_rate: 0.02, max_seq_len: 64, warmup: 0, mixed_precision: '{mp}'}}\n"
                       "lora: {r: 4, dropout: 0.0}\ncheckpointing: {eval_steps: 3, save_steps: 3, early_stopping_patience: null}\n")
        res = run_cli("run", str(job))
        assert res.returncode == 0, res.stderr
        summaries[mp] = json.loads(res.stdout)
        final[mp] = _final_valid_loss(tmp_path / mp)
    assert summaries["no"]["mixed_precision"] == "no" and summaries["bf16"]["mixed_precision"] == "bf16"
    assert summaries["auto"]["mixed_precision"] == precision.resolve("auto", "cpu")
    assert final["bf16"] != final["no"], "bf16 changed the arithmetic"
    assert abs(final["bf16"] - final["no"]) / final["no"] < 0.02, final
    assert final["auto"] == final[summaries["auto"]["mixed_precision"]], "auto is exactly the setting it resolved to"
    start = next(r for r in read_metrics(tmp_path / "auto" / "metrics.jsonl") if r["kind"] == "start")
    assert start["mixed_precision"] == summaries["auto"]["mixed_precision"]


def test_chat_dtype_auto_follows_the_training_probe():
    from tunejob.errors import TunejobError
    from tunejob.server.config import ServerConfig
    from tunejob.server.inference.generation import EngineOptions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = torch.bfloat16 if precision.resolve("auto", device) == "bf16" else torch.float32
    assert EngineOptions(dtype="auto").torch_dtype() == expected
    assert EngineOptions().dtype == ServerConfig.chat_dtype == "auto"  # one default: the server's (server/config.py)
    assert EngineOptions(dtype="float32").torch_dtype() == torch.float32
    with pytest.raises(TunejobError, match="auto"):
        EngineOptions(dtype="fp8")


def test_plan_follows_the_chosen_precision(tmp_path, tiny_model):
    from tunejob.plan.planner import plan_job

    data = write_chat_data(tmp_path / "d.jsonl", 12)
    plans = {}
    for mp in ("no", "bf16", "auto"):
        spec = parse_spec(f"model: {tiny_model}\ndata: {{train: {data}}}\nhyperparameters: {{mixed_precision: '{mp}', max_seq_len: 64}}\n")
        plans[mp] = plan_job(spec)
    assert plans["no"]["mixed_precision"] == "no" and plans["bf16"]["mixed_precision"] == "bf16"
    assert plans["auto"]["mixed_precision"] == precision.resolve("auto", "cpu")
    # the frozen base at 2 bytes a parameter instead of 4; the time estimate against bf16's own GEMM peak
    assert plans["bf16"]["memory"]["weights_gb"] == pytest.approx(plans["no"]["memory"]["weights_gb"] / 2, rel=0.05)
    assert plans["no"]["time"]["precision"] == "fp32" and plans["bf16"]["time"]["precision"] == "bf16"


def test_a_resumed_auto_run_keeps_the_precision_it_started_in(tmp_path, tiny_model, monkeypatch):
    """Issue 31, finding 11: `auto` is measured per thread count, which differs between a serve
    child, the CLI and a Ray node, so a resume could resolve it the other way and switch precision
    half-way. Started where bf16 is fast, resumed where it is not: the run stays in bf16."""
    from tunejob.train.trainer import train

    data = write_chat_data(tmp_path / "d.jsonl", 16)
    text = (f"model: {tiny_model}\ndata: {{train: {data}, val_fraction: 0.25}}\noutput_dir: {tmp_path / 'run'}\n"
            "hyperparameters: {epochs: 2, batch_size: 4, learning_rate: 0.01, max_seq_len: 64, warmup: 0, max_steps: MAX}\n"
            "lora: {r: 4}\ncheckpointing: {eval_steps: 2, save_steps: 2, early_stopping_patience: null}\n")
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: True)
    first = train(parse_spec(text.replace("MAX", "2")), say=lambda m: None)
    assert first["mixed_precision"] == "bf16"
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: False)  # the resuming process measures otherwise
    resumed = train(parse_spec(text.replace("MAX", "4")), say=lambda m: None)
    assert resumed["steps"] == 4 and resumed["mixed_precision"] == "bf16"
    starts = [r["mixed_precision"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "start"]
    assert starts == ["bf16", "bf16"]


def test_plan_and_auto_read_one_probe(tmp_path, monkeypatch):
    """Issue 32: plan's time estimate measured its own GEMM (0.5 s loop, current threads) while
    `auto` measured another (best of 3, keyed by thread count), so they could disagree on one
    machine. Both now read one probe, cached per machine: a second read measures nothing."""
    from tunejob.plan.memory import measure_cpu_peak_flops

    monkeypatch.setenv("TUNEJOB_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(precision, "measure_cpu", lambda: calls.append(1) or {"fp32_gflops": 90.0, "bf16_gflops": 360.0, "bf16_fast": True,
                                                                  "attention_fp32_up_to": 64})
    assert measure_cpu_peak_flops("fp32") == 90.0e9 and measure_cpu_peak_flops("bf16") == 360.0e9
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # another thread count: the same probe, not a new one
    try:
        assert precision.cached_cpu_probe()["bf16_gflops"] == 360.0
    finally:
        torch.set_num_threads(threads)
    assert calls == [1]
