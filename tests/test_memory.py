"""Trainable parameters and the memory estimate, from real module shapes."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, write_chat_data
from tunejob.plan.memory import estimate_memory
from tunejob.train.shapes import lora_parameters, shape_of


def llama(hidden=4096, layers=32, inter=11008, heads=32, kv=32, vocab=32000):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=False)
    with torch.device("meta"):
        return shape_of(AutoModelForCausalLM.from_config(cfg))


def test_the_guides_lora_arithmetic():
    shape = llama()
    # one 4096x4096 matrix at r=16: 16 x (4096 + 4096)
    one = [lin for lin in shape.linears if lin[0].endswith("layers.0.self_attn.q_proj")]
    assert one[0][1:] == (4096, 4096) and 16 * (4096 + 4096) == 131_072
    # q_proj + v_proj over 32 layers at r=16: about 8.4M
    assert lora_parameters(shape, "attention", 16) == 32 * 2 * 131_072 == 8_388_608
    # all-linear adds k, o, gate, up, down (lm_head excluded)
    per_layer = 4 * 16 * (4096 + 4096) + 3 * 16 * (4096 + 11008)
    assert lora_parameters(shape, "all-linear", 16) == 32 * per_layer


def test_gqa_models_use_real_shapes():
    shape = llama(hidden=576, layers=30, inter=1536, heads=9, kv=3, vocab=49152)  # SmolLM2-135M
    # v_proj is 576 -> 192 under grouped-query attention
    assert lora_parameters(shape, "attention", 16) == 30 * (16 * (576 + 576) + 16 * (576 + 192)) == 921_600


def test_7b_weights_and_qlora():
    shape = llama()
    fp32 = estimate_memory(shape, r=16, target="attention", micro_batch=1, seq_len=512, dtype="fp32", device="cuda")
    nf4 = estimate_memory(shape, r=16, target="attention", quantization="4bit", micro_batch=1, seq_len=512, dtype="bf16", device="cuda")
    assert fp32.weights_gb == pytest.approx(shape.total_params * 4 / 2**30, rel=1e-3)  # ~25 GiB ("28 GB")
    assert 3.0 < nf4.weights_gb < 4.2  # QLoRA: a 7B model's weights in ~3.5 GiB
    assert fp32.weights_gb / nf4.weights_gb > 6
    assert nf4.adapter_gb == pytest.approx(8_388_608 * 16 / 2**30, rel=1e-3)
    fits = estimate_memory(shape, r=16, target="attention", quantization="4bit", micro_batch=1, seq_len=512, dtype="bf16", device="cuda", gpu_memory_gb=8)
    assert fits.fits is True
    no = estimate_memory(shape, r=16, target="attention", micro_batch=4, seq_len=2048, dtype="bf16", device="cuda", gpu_memory_gb=8)
    assert no.fits is False and any("4bit" in a for a in no.advice) and any("checkpointing" in a for a in no.advice)


def test_estimate_matches_the_lora_wrapped_model(tiny_model):
    """The arithmetic equals what peft actually makes trainable."""
    from tunejob.spec import parse_spec
    from tunejob.train.adapter import add_lora, count_parameters, load_model

    for target in ("attention", "all-linear"):
        spec = parse_spec(f"model: {tiny_model}\ndata: {{train: x}}\nlora: {{r: 8, target_modules: {target}}}\n")
        model = load_model(spec, str(tiny_model), torch.device("cpu"))
        shape = shape_of(model)
        trainable, _ = count_parameters(add_lora(spec, model))
        assert lora_parameters(shape, target, 8) == trainable


def test_plan_local_cli(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 30)
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: {tiny_model}\ndata: {{train: {data}}}\nhyperparameters: {{epochs: 2, batch_size: 4, max_seq_len: 64}}\n"
                    "checkpointing: {eval_steps: 5, save_steps: 5}\n")
    res = run_cli("plan", str(spec), "--json", "--gpu-memory", "0.01")
    assert res.returncode == 0, res.stderr
    p = json.loads(res.stdout)
    assert p["train_examples"] == 27 and p["validation_examples"] == 3
    assert p["steps"] == 2 * 7 and p["micro_batch"] == 4 and p["packing"] == 0  # GPUs batch: no packing
    assert p["memory"]["fits"] is False and p["memory"]["advice"]
    assert p["trainable_parameters"] > 0 and p["warnings"]
    text = run_cli("plan", str(spec))
    assert text.returncode == 0 and "trainable" in text.stdout and "time" in text.stdout
    assert "short sequences share a forward pass, up to 512 tokens" in text.stdout  # on CPU, packing: auto


def test_plan_api_cli_with_cost_fields():
    res = run_cli("plan", "examples/openai_gpt4o_mini.yaml", "--json")
    assert res.returncode == 0, res.stderr
    p = json.loads(res.stdout)
    assert p["epochs"] == 3 and p["training_cost_usd"] > 0 and p["price_per_1m_usd"] == 3.0
    res = run_cli("plan", "examples/bedrock_nova_micro.yaml", "--json")
    assert res.returncode == 0 and "pass --price-per-1m" in json.loads(res.stdout)["cost_note"]


def test_plan_says_how_a_multi_node_job_is_placed(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 30)
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: {tiny_model}\ndata: {{train: {data}}}\nhyperparameters: {{epochs: 1, batch_size: 8, max_seq_len: 64}}\n"
                    "distributed: {processes: 2, nodes: 2}\n")
    res = run_cli("plan", str(spec), "--json", "--gpu-memory", "80")
    assert res.returncode == 0, res.stderr
    p = json.loads(res.stdout)
    # 8 examples a step over 2 x 2 workers: 2 each, in one forward pass on a GPU (the trainer's micro-batch rule)
    assert p["placement"] == {"workers": 4, "nodes": 2, "processes_per_node": 2, "ray_strategy": "SPREAD", "batch_per_worker": 2,
                              "micro_batch": 2, "memory_per_worker_gb": p["memory"]["total_gb"]}
    text = run_cli("plan", str(spec), "--gpu-memory", "80").stdout
    assert "4 workers = 2 per node x 2 node(s)" in text and "SPREAD" in text
