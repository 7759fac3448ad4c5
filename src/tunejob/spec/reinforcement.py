"""Reinforcement fine-tuning settings: OpenAI's `FineTuneReinforcementHyperparameters`, exact to
its published schema, and what each `auto` (and `compute_multiplier`) means on the local backend.

    method:
      type: reinforcement
      grader: {type: string_check, name: capital, input: "{{sample.output_text}}", reference: "{{item.capital}}", operation: ilike}
      hyperparameters: {compute_multiplier: 1, eval_interval: 4}

Local meaning (train/reinforcement.py runs GRPO on the LoRA adapter):
- `compute_multiplier` scales the answers sampled per prompt (GRPO's group): 8 x m, rounded, kept in
  2..64. OpenAI says only "compute used for exploring search space"; the group is that compute
  here. `auto` is 1, so 8 answers per prompt, TRL GRPOTrainer's default `num_generations`.
- `n_epochs`, `batch_size` (prompts per step) and `eval_interval` (steps between evaluations) set
  the spec's epochs, batch size and checkpointing.eval_steps; `auto` keeps those.
- `learning_rate_multiplier` scales the local learning rate; `auto` is 1.
- `eval_samples`: answers per held-out prompt at each evaluation; `auto` is 1, the greedy answer,
  so the validation reward is deterministic and the best checkpoint is the one whose own answers
  score highest. More samples are drawn at the training temperature and averaged.
- `reasoning_effort` is recorded and sent on to OpenAI-compatible services; the open models here
  have no reasoning mode, so the local backend notes that it changes nothing.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]
DEFAULT_GROUP = 8  # TRL GRPOConfig.num_generations
MAX_GROUP = 64
DEFAULT_KL_BETA = 0.04  # the GRPO paper's (DeepSeekMath) KL coefficient; TRL 1.16 defaults to 0 (no KL term)
DEFAULT_COMPLETION_TOKENS = 64
DEFAULT_TEMPERATURE = 1.0  # TRL's and OpenAI's sampling default


class ReinforcementHyperparameters(BaseModel):
    """OpenAI's FineTuneReinforcementHyperparameters (same names, ranges and defaults)."""

    model_config = ConfigDict(extra="forbid")
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Auto = "auto"
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    compute_multiplier: Annotated[float, Field(ge=0.00001, le=10)] | Auto = "auto"
    eval_interval: Annotated[int, Field(ge=1)] | Auto = "auto"
    eval_samples: Annotated[int, Field(ge=1)] | Auto = "auto"


def group_size(compute_multiplier: float | str) -> int:
    """Answers sampled per prompt for a compute_multiplier (see the module docstring)."""
    m = 1.0 if compute_multiplier == "auto" else float(compute_multiplier)
    return max(2, min(MAX_GROUP, round(DEFAULT_GROUP * m)))


def eval_samples(value: int | str) -> int:
    return 1 if value == "auto" else int(value)
