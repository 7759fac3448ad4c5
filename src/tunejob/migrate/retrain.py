"""`tunejob migrate retrain`: the recorded OpenAI job as a tunejob spec on an open base.

    spec_path, mapping = write_retrain_spec(Path("migrations/acme"), base="default", distill=True)

How OpenAI's settings map onto LoRA (each choice is written into retrain.json with its reason):
- n_epochs -> hyperparameters.epochs. The job object carries the value OpenAI resolved once the
  job ran; a job that never resolved it gets OpenAI's documented auto rule (plan.cost.auto_epochs).
- batch_size -> hyperparameters.batch_size: examples per optimizer step means the same in both.
  Unresolved `auto`: OpenAI publishes no rule; observed jobs use about 0.2% of the examples,
  between 1 and 256, and that is what is used (said so in retrain.json).
- learning_rate_multiplier -> hyperparameters.learning_rate = LoRA's default (2e-4) x multiplier.
  OpenAI's multiplier scales a base rate it does not publish; tunejob takes LoRA's tested default
  as that base (as `tunejob serve` does), so a job that asked for half the rate gets half.
  Unresolved `auto` is 1.
- LoRA's own settings (rank, targets, dropout) are tunejob's defaults: OpenAI does not say what
  it trains. `--set lora.r=32` (any spec field) changes them in retrain.yaml.
- method (supervised | dpo with beta | reinforcement with its grader), seed: as recorded. Checkpoints, evaluation and early stopping
  are tunejob's (evaluation once per epoch, as OpenAI's checkpoints are), the best kept.

--distill adds the golden answers to prompts the training file does not hold (validation
conversations, --prompts) as training conversations: the model that is going away teaches the
new one how it answered. A seeded share (`holdout`, default 20%) is kept out of training and
listed in retrain.json, so `compare` can report answers on prompts the retrained model never saw.
Validation then uses only the validation conversations that were not distilled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from tunejob.data.dataset import write_jsonl
from tunejob.migrate.prompts import item_of, training_ids
from tunejob.migrate.record import MigrateError, read_rows, reinforcement_method
from tunejob.train.checkpoint import write_json_atomic

def resolve_openai(hp: dict, n_examples: int) -> dict:
    """{name: (value, how it was chosen)} for n_epochs, batch_size and learning_rate_multiplier (pure)."""
    from tunejob.plan.cost import auto_epochs

    out = {}
    epochs = hp.get("n_epochs", "auto")
    out["n_epochs"] = (epochs, "as the job ran") if epochs != "auto" else (auto_epochs(max(1, n_examples)), "OpenAI's documented auto rule (3, more for small data, fewer for large)")
    batch = hp.get("batch_size", "auto")
    out["batch_size"] = (batch, "as the job ran") if batch != "auto" else (
        max(1, min(256, round(0.002 * n_examples))), "unresolved auto: OpenAI publishes no rule; observed jobs use about 0.2% of the examples, 1 to 256")
    lrm = hp.get("learning_rate_multiplier", "auto")
    out["learning_rate_multiplier"] = (float(lrm), "as the job ran") if lrm != "auto" else (1.0, "unresolved auto: OpenAI publishes no rule; 1 keeps LoRA's default rate")
    return out


def lora_hyperparameters(resolved: dict, seed: int | None) -> dict:
    """OpenAI's resolved settings as tunejob's (pure)."""
    from tunejob.spec import LORA_DEFAULT_LR

    lr = LORA_DEFAULT_LR * resolved["learning_rate_multiplier"][0]
    out = {"epochs": int(resolved["n_epochs"][0]), "batch_size": int(resolved["batch_size"][0]), "learning_rate": lr}
    if seed is not None:
        out["seed"] = int(seed)
    return out


def distill_split(golden: list[dict], trained: set[str], holdout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(golden answers to train on, held out): answered and not already in the training file; the
    held-out share drawn with a seeded RNG (pure). Answers cut by record's --max-tokens are kept
    (they are what the source said; retrain.json counts them)."""
    usable = [g for g in golden if "answer" in g and g["id"] not in trained
              and (g["answer"].get("content") or g["answer"].get("tool_calls"))]
    order = sorted(usable, key=lambda g: g["id"])
    random.Random(seed).shuffle(order)
    n_out = round(holdout * len(order)) if len(order) > 1 else 0
    held = {g["id"] for g in order[:n_out]}
    return [g for g in usable if g["id"] not in held], [g for g in usable if g["id"] in held]


def as_training_example(entry: dict) -> dict:
    """A golden line as a chat training example: its prompt plus the recorded answer."""
    answer = {"role": "assistant", "content": entry["answer"].get("content")}
    if entry["answer"].get("tool_calls"):
        answer["tool_calls"] = entry["answer"]["tool_calls"]
    example = {"messages": [*entry["messages"], answer]}
    for key in ("tools", "parallel_tool_calls"):
        if entry.get(key) is not None:
            example[key] = entry[key]
    return example


def _recorded(folder: Path) -> tuple[dict, str, list[dict], list[dict], list[dict]]:
    from tunejob.migrate.golden import GoldenLog

    if not (folder / "migration.json").is_file():
        raise MigrateError(f"{folder}: no migration.json here; run `tunejob migrate record MODEL --out {folder}` first")
    job = json.loads((folder / "job.json").read_text()) if (folder / "job.json").is_file() else {}
    method = ((job.get("method") or {}).get("type")) or "supervised"
    train = read_rows(folder / "data" / "train.jsonl") if (folder / "data" / "train.jsonl").is_file() else []
    validation = read_rows(folder / "data" / "validation.jsonl") if (folder / "data" / "validation.jsonl").is_file() else []
    return job, method, train, validation, GoldenLog(folder / "golden.jsonl").answers()


def write_retrain_spec(folder: Path, base: str, distill: bool = False, holdout: float = 0.2, seed: int = 0,
                       overrides: list[str] | None = None) -> tuple[Path, dict]:
    """Write FOLDER/retrain.yaml (and retrain.json: the mapping and the distilled ids)."""
    from tunejob.spec import JobSpec
    from tunejob.spec.loader import apply_override

    folder = Path(folder).resolve()
    job, method, train, validation, golden = _recorded(folder)
    if distill and method != "supervised":
        data_kind = "preference pairs" if method == "dpo" else "prompts and a grader"
        raise MigrateError(f"--distill adds answers as chat examples; this job trained {method} on {data_kind}, so retrain it without --distill")
    hp_job = ((job.get("method") or {}).get(method) or {}).get("hyperparameters") or job.get("hyperparameters") or {}
    used, held = distill_split(golden, training_ids(train), holdout, seed) if distill else ([], [])
    if not train and not used:
        raise MigrateError(f"{folder}: no training data was saved (the file was deleted before record); "
                           "retrain with --distill to learn from the golden answers, or put your copy at data/train.jsonl")
    resolved = resolve_openai(hp_job, len(train) + len(used))
    data = {"train": "data/train.jsonl"}
    if used:
        write_jsonl(folder / "data" / "train_distill.jsonl", [*train, *(as_training_example(g) for g in used)])
        data["train"] = "data/train_distill.jsonl"
    distilled = {g["id"] for g in used}
    kept = [row for row in validation if (item_of(row, "validation") or {}).get("id") not in distilled]
    if kept:
        write_jsonl(folder / "data" / "validation_retrain.jsonl", kept)
        data["validation"] = "data/validation_retrain.jsonl"
    epochs, batch = int(resolved["n_epochs"][0]), int(resolved["batch_size"][0])
    per_epoch = max(1, -(-(len(train) + len(used)) // batch))
    spec = {"name": "retrained", "backend": "local", "model": base, "data": data,
            "hyperparameters": lora_hyperparameters(resolved, job.get("seed")), "method": {"type": method},
            "checkpointing": {"eval_steps": per_epoch, "save_steps": per_epoch},
            "output_dir": str(folder / "retrained")}
    if method == "dpo" and hp_job.get("beta") not in (None, "auto"):
        spec["method"]["beta"] = hp_job["beta"]
    if method == "reinforcement":  # the same grader, now scoring GRPO's answers on the open base (train/reinforcement.py)
        spec["method"].update(reinforcement_method(job))
    for item in overrides or []:
        apply_override(spec, item)
    JobSpec.model_validate({**spec, "data": {k: str(folder / v) for k, v in data.items()}})  # fails here, not at run time
    mapping = {"openai": {k: {"value": v, "how": how} for k, (v, how) in resolved.items()}, "tunejob": spec["hyperparameters"],
               "why": __doc__.split("with its reason):", 1)[1].split("--distill", 1)[0].strip(),
               "epochs_x_steps": [epochs, per_epoch], "distilled": sorted(distilled), "held_out": sorted(g["id"] for g in held),
               "training_examples": len(train), "distilled_examples": len(used),
               "distilled_cut_by_max_tokens": sum(1 for g in used if g.get("finish_reason") == "length")}
    path = folder / "retrain.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    write_json_atomic(folder / "retrain.json", mapping)
    return path, mapping
