"""What an API fine-tuning job costs, before it runs. Pure functions over token counts and prices.

The guide's formula: training cost = trained tokens / 1,000 x price per 1K x epochs, where the
trained tokens are counted per example and capped at the model's example limit (OpenAI bills
min(65,536, tokens) per example for the gpt-4o / gpt-4.1 families). The guide's own example:
400K tokens x 3 epochs x $8 per 1M = $9.60. Validation tokens are not billed on OpenAI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunejob.errors import PriceError

# OpenAI's `auto` epochs (data-preparation cookbook): aim for 100..25,000 example passes.
AUTO_EPOCHS = 3
MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES = 100, 25_000
MIN_DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS = 1, 25
DAYS_PER_MONTH = 30


def auto_epochs(n_examples: int) -> int:
    """3 epochs, raised so that examples x epochs reaches 100 (up to 25), lowered so that it stays
    under 25,000 (down to 1). 20 examples -> 5 epochs; 10,000 -> 2."""
    if n_examples <= 0:
        raise PriceError(f"cannot pick epochs for {n_examples} examples; the dataset has no valid example")
    epochs = AUTO_EPOCHS
    if n_examples * epochs < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    elif n_examples * epochs > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return epochs


def billed_tokens(tokens_per_example: list[int], cap: int | None) -> int:
    """Tokens of one epoch as billed: each example counts at most `cap` tokens."""
    if cap is None:
        return sum(tokens_per_example)
    return sum(min(cap, t) for t in tokens_per_example)


def training_cost(tokens_per_epoch: int, epochs: int, price_per_1m: float) -> float:
    """tokens / 1,000 x (price per 1M / 1,000) x epochs."""
    _check_non_negative(tokens=tokens_per_epoch, epochs=epochs, price_per_1m=price_per_1m)
    return tokens_per_epoch / 1000 * (price_per_1m / 1000) * epochs


def inference_cost_per_day(queries_per_day: float, tokens_per_query: float, input_per_1m: float, output_per_1m: float, output_fraction: float) -> float:
    """Daily cost of serving: each query's tokens split into prompt (input) and answer (output)."""
    _check_non_negative(queries_per_day=queries_per_day, tokens_per_query=tokens_per_query)
    if not 0 <= output_fraction <= 1:
        raise PriceError(f"--output-fraction must be between 0 and 1, got {output_fraction}")
    tokens = queries_per_day * tokens_per_query
    return tokens * (1 - output_fraction) / 1e6 * input_per_1m + tokens * output_fraction / 1e6 * output_per_1m


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if value is None or value < 0:
            raise PriceError(f"{name.replace('_', '-')}: must be zero or more, got {value}")


@dataclass
class CostEstimate:
    model: str
    examples: int | None
    trained_tokens: int  # per epoch, as billed (capped per example)
    epochs: int
    epochs_auto: bool
    price_per_1m_usd: float
    training_cost_usd: float
    price_source: str
    tokens_approximate: bool = False
    examples_capped: int = 0
    validation_billed: bool = False
    inference_cost_per_day_usd: float | None = None
    base_inference_cost_per_day_usd: float | None = None
    inference_cost_per_month_usd: float | None = None
    base_inference_cost_per_month_usd: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(
    model: str | None,
    *,
    tokens_per_example: list[int] | None = None,
    total_tokens: int | None = None,
    epochs: int | None = None,
    price_per_1m: float | None = None,
    queries_per_day: float | None = None,
    tokens_per_query: float | None = None,
    output_fraction: float = 0.25,
    tokens_approximate: bool = False,
) -> CostEstimate:
    """The whole estimate from per-example token counts (or a total) and the price table."""
    from tunejob import catalog

    info = catalog.lookup(model) if model else None
    if price_per_1m is None:
        if not model:
            raise PriceError("give --model (its price comes from the table) or --price-per-1m (the guide's formula needs a price)")
        if info is None or info.training_per_1m is None:
            known = ", ".join(n for n in catalog.known_models() if (catalog.lookup(n) and catalog.lookup(n).training_per_1m))
            why = "has no per-token training price" if info else "is not in the price table"
            raise PriceError(f"model {model!r} {why}; pass --price-per-1m, or use one of: {known}")
        price_per_1m, source = info.training_per_1m, f"{info.source}, {info.date}"
    else:
        source = "--price-per-1m"
    _check_non_negative(price_per_1m=price_per_1m)
    cap = info.max_example_tokens if info else None
    if tokens_per_example is not None:
        n = len(tokens_per_example)
        per_epoch = billed_tokens(tokens_per_example, cap)
        capped = sum(1 for t in tokens_per_example if cap and t > cap)
    elif total_tokens is not None:
        _check_non_negative(tokens=total_tokens)
        n, per_epoch, capped = None, total_tokens, 0
    else:
        raise PriceError("give the data (--data FILE) or a token count (--tokens N)")
    if epochs is None:
        if n is None:
            raise PriceError("with --tokens, give --epochs too: OpenAI's auto epochs depend on the number of examples")
        epochs, is_auto = auto_epochs(n), True
    else:
        if epochs < 1:
            raise PriceError(f"epochs: must be at least 1, got {epochs}")
        is_auto = False
    result = CostEstimate(
        model=model, examples=n, trained_tokens=per_epoch, epochs=epochs, epochs_auto=is_auto,
        price_per_1m_usd=price_per_1m, training_cost_usd=round(training_cost(per_epoch, epochs, price_per_1m), 6),
        price_source=source, tokens_approximate=tokens_approximate, examples_capped=capped,
    )
    if queries_per_day is not None or tokens_per_query is not None:
        if queries_per_day is None or tokens_per_query is None:
            raise PriceError("give both --queries-per-day and --tokens-per-query for the inference cost")
        if info is None or not info.finetuned or not info.base:
            raise PriceError(f"model {model!r}: no inference prices in the table, so no inference cost")
        ft, base = info.finetuned, info.base
        result.inference_cost_per_day_usd = round(inference_cost_per_day(queries_per_day, tokens_per_query, ft["input_per_1m"], ft["output_per_1m"], output_fraction), 6)
        result.base_inference_cost_per_day_usd = round(inference_cost_per_day(queries_per_day, tokens_per_query, base["input_per_1m"], base["output_per_1m"], output_fraction), 6)
        result.inference_cost_per_month_usd = round(result.inference_cost_per_day_usd * DAYS_PER_MONTH, 4)
        result.base_inference_cost_per_month_usd = round(result.base_inference_cost_per_day_usd * DAYS_PER_MONTH, 4)
    return result
