"""Cost, memory and parameter arithmetic against hand computation."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_cli
from tunejob.plan import cost
from tunejob.errors import PriceError


def test_the_guides_example():
    # 400K tokens x 3 epochs x $8 per 1M = $9.60
    assert cost.training_cost(400_000, 3, 8.00) == pytest.approx(9.60)
    est = cost.estimate("gpt-3.5-turbo", total_tokens=400_000, epochs=3)
    assert est.training_cost_usd == pytest.approx(9.60) and est.price_per_1m_usd == 8.00


@pytest.mark.parametrize(
    "model, tokens, epochs, expected",
    [
        ("gpt-4o-mini-2024-07-18", 1_000_000, 3, 9.00),   # $3.00/1M
        ("gpt-4.1-mini", 250_000, 4, 5.00),               # $5.00/1M
        ("gpt-4.1-2025-04-14", 100_000, 2, 5.00),         # $25.00/1M
        ("gpt-4.1-nano", 2_000_000, 1, 3.00),             # $1.50/1M
        ("gpt-4o", 40_000, 3, 3.00),                      # $25.00/1M
        ("ft:gpt-4o-mini-2024-07-18:acme:sales:abc", 500_000, 2, 3.00),  # fine-tuned names price as their base
    ],
)
def test_cost_table(model, tokens, epochs, expected):
    assert cost.estimate(model, total_tokens=tokens, epochs=epochs).training_cost_usd == pytest.approx(expected)


@pytest.mark.parametrize("n, epochs", [(1, 25), (10, 10), (20, 5), (33, 3), (34, 3), (100, 3), (8_333, 3), (8_334, 2), (10_000, 2), (30_000, 1)])
def test_openai_auto_epochs(n, epochs):
    assert cost.auto_epochs(n) == epochs


def test_tokens_are_capped_per_example():
    # gpt-4.1-nano bills at most 32,768 tokens per example
    est = cost.estimate("gpt-4.1-nano", tokens_per_example=[1_000, 40_000, 32_768], epochs=1)
    assert est.trained_tokens == 1_000 + 32_768 + 32_768 and est.examples_capped == 1


def test_inference_cost_fine_tuned_vs_base():
    # gpt-4o-mini: fine-tuned $0.30 in / $1.20 out; base $0.15 / $0.60 per 1M.
    est = cost.estimate("gpt-4o-mini", total_tokens=1, epochs=1, queries_per_day=1000, tokens_per_query=500, output_fraction=0.2)
    # 500K tokens/day: 400K in, 100K out
    assert est.inference_cost_per_day_usd == pytest.approx(0.4 * 0.30 + 0.1 * 1.20)
    assert est.base_inference_cost_per_day_usd == pytest.approx(0.4 * 0.15 + 0.1 * 0.60)
    assert est.inference_cost_per_month_usd == pytest.approx(30 * est.inference_cost_per_day_usd)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "llama-9000", "total_tokens": 10, "epochs": 1}, "not in the price table; pass --price-per-1m"),
        ({"model": "gpt-4o-mini", "total_tokens": -1, "epochs": 1}, "must be zero or more"),
        ({"model": "gpt-4o-mini", "total_tokens": 10, "epochs": 0}, "at least 1"),
        ({"model": "gpt-4o-mini", "total_tokens": 10}, "give --epochs too"),
        ({"model": "gpt-4o-mini", "total_tokens": 10, "epochs": 1, "price_per_1m": -3}, "must be zero or more"),
        ({"model": "gpt-4o-mini"}, "give the data"),
        ({"model": "anthropic.claude-3-haiku-20240307-v1:0", "total_tokens": 10, "epochs": 1}, "has no per-token training price"),
    ],
)
def test_bad_cost_input_is_a_clear_error(kwargs, message):
    with pytest.raises(PriceError, match=message):
        cost.estimate(**kwargs)


def test_price_override_for_unknown_models():
    assert cost.estimate("my-vendor-model", total_tokens=1_000_000, epochs=2, price_per_1m=4.0).training_cost_usd == pytest.approx(8.0)


def test_cost_cli_json_contract():
    data = REPO / "examples" / "data" / "sales_companion.jsonl"
    res = run_cli("cost", "--model", "gpt-4o-mini-2024-07-18", "--data", str(data), "--queries-per-day", "1000", "--tokens-per-query", "500", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("training_cost_usd", "trained_tokens", "epochs", "price_per_1m_usd", "inference_cost_per_day_usd", "base_inference_cost_per_day_usd"):
        assert key in out
    assert out["epochs"] == 3 and out["examples"] >= 100  # auto: 132 x 3 lies in 100..25,000
    assert out["training_cost_usd"] == pytest.approx(out["trained_tokens"] * 3 * 3.0 / 1e6, rel=1e-4)
    assert out["openai_wind_down"]["dates"][-1][0] == "2027-01-06"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope", "--tokens", "100", "--epochs", "1"], "not in the price table"),
        (["--model", "gpt-4o-mini", "--tokens", "-100", "--epochs", "1"], "must be zero or more"),
        (["--model", "gpt-4o-mini", "--data", "/no/such.jsonl"], "no such file"),
    ],
)
def test_cost_cli_errors(args, message):
    res = run_cli("cost", *args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
