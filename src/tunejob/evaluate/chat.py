"""Talking to a trained run: base model + the best (or a chosen) LoRA adapter, and merged export."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from tunejob.train import checkpoint as ckpt
from tunejob.errors import ModelError
from tunejob.train.models import load_tokenizer, resolve_model_path


def run_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A checkpoint directory: the path itself if it is one, else the run's best."""
    p = Path(run_or_ckpt)
    if (p / "adapter_config.json").is_file():
        return p
    if not p.exists():
        raise ModelError(f"{p}: no such run directory or checkpoint")
    best = ckpt.best_checkpoint(p)
    if best is None:
        raise ModelError(f"{p}: no checkpoint here yet; run `tunejob run` first")
    return best


def base_model_of(checkpoint_dir: Path) -> str:
    spec = yaml.safe_load((checkpoint_dir / "config.yaml").read_text())
    return resolve_model_path(spec.get("model", "default"))


def tokenizer_of(checkpoint_dir: Path | None, base_path: str):
    """The tokenizer a checkpoint trained with: its base's, under the run's `chat_template:` if it named one."""
    spec = (yaml.safe_load((checkpoint_dir / "config.yaml").read_text()) or {}) if checkpoint_dir is not None else {}
    return load_tokenizer(base_path, spec.get("chat_template"))


def quantization_of(checkpoint_dir: Path) -> str:
    spec = yaml.safe_load((checkpoint_dir / "config.yaml").read_text()) or {}
    return spec.get("quantization", "none")


def load_for_chat(run_or_ckpt: str | Path | None = None, base: str | None = None, merge: bool = False):
    """(model, tokenizer) for a run's adapter on its base model, or the bare base model.

    A QLoRA adapter answers on the 4-bit base it was trained on. `merge` (export) needs plain
    weights to fold the adapter into, so it loads the base in fp32 and says so."""
    from tunejob.train.adapter import disable_bnb_avx512bf16, load_base

    checkpoint_dir = run_checkpoint(run_or_ckpt) if run_or_ckpt is not None else None
    base_path = base or (base_model_of(checkpoint_dir) if checkpoint_dir else resolve_model_path("default"))
    tokenizer = tokenizer_of(checkpoint_dir, base_path)
    quantization = quantization_of(checkpoint_dir) if checkpoint_dir is not None and not merge else "none"
    model = load_base(base_path, quantization, torch.device("cpu"))
    if checkpoint_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint_dir))
        disable_bnb_avx512bf16(model)
    model.eval()
    return model, tokenizer


def trained_system_prompt(run_or_ckpt: str | Path) -> str | None:
    """The system prompt every training example of the run began with, or None when they had
    none or several (then no single prompt is "the one the run trained with")."""
    from tunejob.data.dataset import load_examples
    from tunejob.errors import TunejobError

    try:
        spec = yaml.safe_load((run_checkpoint(run_or_ckpt) / "config.yaml").read_text()) or {}
        examples = load_examples(Path(spec["data"]["train"]))
    except (OSError, KeyError, TypeError, yaml.YAMLError, TunejobError):
        return None
    prompts = {ex["messages"][0].get("content") if ex["messages"] and ex["messages"][0].get("role") == "system" else None for ex in examples}
    only = prompts.pop() if len(prompts) == 1 else None
    return only if isinstance(only, str) and only else None


def answer(model, tokenizer, messages: list[dict], max_new_tokens: int = 160) -> str:
    """Greedy answer to one conversation, by the batched engine (engine/answers.py) as every answer
    is; several conversations are cheaper together: answers.greedy."""
    from tunejob.engine.answers import greedy

    return greedy(model, tokenizer, [messages], max_new_tokens)[0].content or ""


class ModelCache:
    """The last few (model, tokenizer) chatted with in this process (the dashboard's chat form), so a
    conversation does not reload weights per message; each loaded by load_for_chat."""

    def __init__(self, size: int = 3):
        import threading
        from collections import OrderedDict

        self.size, self._models, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, base_path: str, adapter: Path | None):
        key = (base_path, str(adapter) if adapter else None)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        loaded = load_for_chat(adapter, base=base_path)
        with self._lock:
            self._models[key] = loaded
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return loaded


def export_merged(run_or_ckpt: str | Path, out_dir: str | Path) -> Path:
    """Fold the adapter into the base weights and save a plain transformers model folder."""
    model, tokenizer = load_for_chat(run_or_ckpt, merge=True)
    merged = model.merge_and_unload()
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        raise ModelError(f"{out}: already exists; choose a new directory for the merged model")
    tmp.rename(out)
    return out
