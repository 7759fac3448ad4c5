"""Bedrock's hyperparameters for one base model: tunejob's spec names mapped onto the model's own
API names, checked against the ranges AWS documents for that model family (resources/models.json
holds each table with its source page and date), before anything is uploaded.

Each family names its knobs differently: Claude 3 Haiku takes `learningRateMultiplier` and
`batchSize` 4-256; Amazon Nova takes an absolute `learningRate` (1e-6 to 1e-4) and no batch size;
Meta Llama 3.x takes `learningRate` and `batchSize` fixed at 1. "auto" (or a key left unset) sends
nothing, so the model's own default applies.
"""

from __future__ import annotations

import datetime

from tunejob import catalog
from tunejob.errors import SpecError
from tunejob.spec import JobSpec

ALTERNATIVES = "use backend: local (LoRA on an open model here) or `tunejob serve` (OpenAI's API on open models)"


def customizable_models(today: datetime.date | None = None) -> list[str]:
    today = today or datetime.date.today()
    return [m for m in catalog.known_models("bedrock") if _current(catalog.lookup(m), today)]


def _current(info, today: datetime.date) -> bool:
    return info is not None and info.customization is not None and not (
        info.end_of_life and datetime.date.fromisoformat(info.end_of_life) <= today)


def _value(spec: JobSpec, path: str):
    """The spec's value at 'section.key', or None when it is 'auto' or was left unset."""
    section, key = path.split(".")
    obj = getattr(spec, section)
    if obj is None or key not in obj.model_fields_set:
        return None
    value = getattr(obj, key)
    return None if value in ("auto", None) else value


def hyperparameters(spec: JobSpec, today: datetime.date | None = None) -> dict[str, str]:
    """The CreateModelCustomizationJob `hyperParameters` for this spec (strings, as the API takes
    them); a SpecError naming every problem otherwise."""
    today = today or datetime.date.today()
    info = catalog.lookup(spec.model)
    if info is None or info.provider != "bedrock" or info.customization is None:
        raise SpecError(f"model: {spec.model!r} cannot be fine-tuned on Bedrock; customizable: "
                        f"{', '.join(customizable_models(today))}; or {ALTERNATIVES}")
    if not _current(info, today):
        raise SpecError(f"model: {info.name} reached end of life on {info.end_of_life} and can no longer be customized; "
                        f"pick one of {', '.join(customizable_models(today))}, or {ALTERNATIVES}")
    table = info.customization["hyperparameters"]
    taken = {entry["maps"]: name for name, entry in table.items()}
    problems, out = [], {}
    for path in ("hyperparameters.epochs", "hyperparameters.batch_size", "hyperparameters.learning_rate",
                 "hyperparameters.learning_rate_multiplier", "hyperparameters.warmup", "checkpointing.early_stopping_patience",
                 "bedrock.early_stopping_threshold"):
        value = _value(spec, path)
        if value is None:
            continue
        if path not in taken:
            problems.append(f"{path}: {info.name} has no such setting (it takes {', '.join(e['maps'] for e in table.values())}); remove it")
            continue
        name = taken[path]
        entry = table[name]
        if entry["type"] == "int" and (float(value) != int(value) or (path == "hyperparameters.warmup" and value < 1)):
            what = "steps (an integer >= 1), not a fraction" if path == "hyperparameters.warmup" else "an integer"
            problems.append(f"{path}: {info.name}'s {name} takes {what}; got {value}")
            continue
        if not entry["min"] <= value <= entry["max"]:
            problems.append(f"{path}: {value} is outside {info.name}'s range for {name}, {entry['min']}-{entry['max']} "
                            f"(default {entry['default']}; AWS: {info.customization['source']})")
            continue
        out[name] = str(int(value)) if entry["type"] == "int" else str(value)
    if problems:
        raise SpecError("; ".join(problems))
    return out
