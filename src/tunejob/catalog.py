"""Models tunejob knows by name: provider, tokenizer, longest training example, prices.

The figures live in resources/models.json, each with its source and the date it was read, so a price
change is a data edit with a visible provenance, not a code change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class ModelInfo:
    name: str
    provider: str  # openai | bedrock | local
    encoding: str | None
    max_example_tokens: int | None
    training_per_1m: float | None = None
    finetuned: dict | None = None
    base: dict | None = None
    source: str = ""
    date: str = ""
    end_of_life: str | None = None
    aliases: tuple[str, ...] = field(default=())
    customization: dict | None = None  # Bedrock: hyperparameter names, ranges, defaults, source


@lru_cache(maxsize=1)
def _catalog() -> dict:
    return json.loads(resources.files("tunejob").joinpath("resources/models.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _index() -> dict[str, ModelInfo]:
    index: dict[str, ModelInfo] = {}
    for name, entry in _catalog()["models"].items():
        info = ModelInfo(
            name=name,
            provider=entry["provider"],
            encoding=entry.get("encoding"),
            max_example_tokens=entry.get("max_example_tokens"),
            training_per_1m=entry.get("training_per_1m"),
            finetuned=entry.get("finetuned"),
            base=entry.get("base"),
            source=entry.get("source", ""),
            date=entry.get("date", ""),
            end_of_life=entry.get("end_of_life"),
            aliases=tuple(entry.get("aliases", [])),
            customization=entry.get("customization"),
        )
        for key in (name, *info.aliases):
            index[key.lower()] = info
    return index


def base_of(model: str) -> str:
    """'ft:gpt-4o-mini-2024-07-18:acme:sales-v1:abc123' -> 'gpt-4o-mini-2024-07-18'."""
    if model.startswith("ft:"):
        parts = model.split(":")
        return parts[1] if len(parts) > 1 else model
    return model


def lookup(model: str) -> ModelInfo | None:
    """The catalog entry for a model id, alias or fine-tuned name; None when unknown."""
    return _index().get(base_of(model).lower())


def known_models(provider: str | None = None) -> list[str]:
    return [n for n, e in _catalog()["models"].items() if provider is None or e["provider"] == provider]


def openai_wind_down() -> dict:
    return _catalog()["openai_wind_down"]
