"""The job spec: one YAML file that describes a fine-tuning job, as typed, validated models.

    tunejob plan examples/sales_companion.yaml --set hyperparameters.epochs=2

Everything is checked before any work starts, and every problem is reported at once, each with
the YAML line, the key, the value and the fix. Data paths are relative to the spec file (so a spec
and its data travel together); `output_dir` is relative to the working directory.

Defaults follow the guide's "starting point" table (epochs 2-4 -> 3, batch size 4-16 -> 8). The
guide's learning rate, 1e-5 to 5e-5, is for full fine-tuning; LoRA adapters start at zero and
learn at 1e-4 to 3e-4 (the QLoRA paper used 2e-4), so `auto` resolves to 2e-4 on the local backend
and to the provider's own default on API backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunejob.spec.reinforcement import DEFAULT_KL_BETA, ReinforcementHyperparameters


Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
LORA_DEFAULT_LR = 2e-4
# What "auto" means on the local backend (API backends leave it to the provider).
LOCAL_AUTO_BATCH_SIZE, LOCAL_AUTO_EPOCHS = 8, 3
# A server job's `batch_size: auto` (server/api/jobs.py), as OpenAI's API documents its own small
# default; the local `auto` above is 8 (one sequence per pass, accumulated: train/batches.py).
OPENAI_AUTO_BATCH_SIZE = 4


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class DataSpec(_Section):
    train: Path = Field(description="Training JSONL file (OpenAI chat or prompt/completion format).")
    validation: Path | None = Field(None, description="Validation JSONL; if absent, split from train.")
    val_fraction: float = Field(0.1, gt=0, le=0.5, description="Share of train held out for validation.")
    seed: int = Field(42, description="Seed of the train/validation split.")


class Hyperparameters(_Section):
    learning_rate: PositiveFloat | Auto = Field("auto", description="Local backend: peak learning rate.")
    learning_rate_multiplier: PositiveFloat | Auto = Field(
        "auto", description="API backends: multiplier of the provider's base learning rate."
    )
    epochs: PositiveInt | Auto = Field(3, description="Full passes over the training data.")
    batch_size: PositiveInt | Auto = Field(8, description="Examples per optimizer step (effective batch).")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup: float = Field(0.03, ge=0, description="Warm-up: a fraction of steps if < 1, else steps.")
    max_seq_len: int = Field(1024, ge=16, le=1_048_576, description="Tokens per example; longer ones are truncated.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (caps epochs).")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: PositiveFloat = Field(1.0, description="Clip the global gradient norm to this (TRL and transformers default 1.0).")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="Local backend: 'bf16' keeps the frozen base in bf16 (adapter, optimizer and loss stay fp32); "
        "'auto' (the default) picks bf16 where the device multiplies bf16 fast (CUDA, CPUs with AMX / AVX512-BF16 whose "
        "measured bf16 matmul beats fp32 1.5x), else 'no' (fp32). API backends take 'auto' and send nothing for it.",
    )
    packing: Literal["auto", "off"] = Field(
        "auto", description="Local backend, supervised: 'auto' (the default) packs short sequences into one forward pass "
        "of up to 512 tokens on CPU, once a check on the first pack shows the model keeps them apart (same losses as one "
        "at a time); 'off' runs one sequence per forward pass. GPUs batch instead; DPO and reinforcement never pack.",
    )
    seed: int = Field(42, description="Training seed (initialisation, shuffling, dropout).")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Compute the loss on assistant tokens only, or on every token."
    )


    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false

    @field_validator("packing", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


DPO_DEFAULT_BETA = 0.1  # TRL's DPOConfig default


class MethodSpec(_Section):
    """OpenAI's fine-tuning method. `dpo` trains on preference pairs (data/preference.py);
    `reinforcement` samples answers and trains on a grader's scores (spec/reinforcement.py)."""

    type: Literal["supervised", "dpo", "reinforcement"] = Field(
        "supervised", description="supervised (chat data), dpo (preference pairs) or reinforcement (prompts and a grader).")
    beta: PositiveFloat | None = Field(None, description="DPO and reinforcement: how far the model may move from the base "
                                       "(DPO: default 0.1 locally; reinforcement: the KL coefficient, default 0.04).")
    grader: dict | None = Field(None, description="Reinforcement: OpenAI's grader object (string_check, text_similarity, python, score_model, multi).")
    hyperparameters: ReinforcementHyperparameters | None = Field(
        None, description="Reinforcement: OpenAI's hyperparameters (compute_multiplier, eval_interval, eval_samples, ...).")
    completion_tokens: int | None = Field(None, ge=1, le=8192, description="Reinforcement: most tokens per sampled answer (default 64).")
    temperature: float | None = Field(None, gt=0, le=2, description="Reinforcement: sampling temperature of the answers (default 1.0).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"type": v} if isinstance(v, str) else v  # `method: dpo`

    @model_validator(mode="after")
    def _fields_of_type(self) -> "MethodSpec":
        if self.beta is not None and self.type == "supervised":
            raise ValueError("beta: applies to method types dpo and reinforcement; remove it or set method.type: dpo")
        rl_only = [k for k in ("grader", "hyperparameters", "completion_tokens", "temperature") if getattr(self, k) is not None]
        if rl_only and self.type != "reinforcement":
            raise ValueError(f"{rl_only[0]}: applies to method type reinforcement only; remove it or set method.type: reinforcement")
        if self.type == "reinforcement" and not self.grader:
            raise ValueError("grader: method reinforcement needs a grader, e.g. "
                             "{type: string_check, name: exact, input: '{{sample.output_text}}', reference: '{{item.answer}}', operation: eq}")
        return self

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return DEFAULT_KL_BETA if self.type == "reinforcement" else DPO_DEFAULT_BETA

    @property
    def rl(self) -> ReinforcementHyperparameters:
        return self.hyperparameters or ReinforcementHyperparameters()


class LoraSpec(_Section):
    r: int = Field(16, ge=1, le=1024, description="Rank of the adapter matrices (start at 16; 32-64 to learn more).")
    alpha: float | None = Field(None, gt=0, description="Scaling; defaults to 2 x r.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["attention", "all-linear"] | list[str] = Field(
        "attention", description="'attention' = q_proj+v_proj, 'all-linear', or module names."
    )

    @model_validator(mode="after")
    def _targets(self) -> "LoraSpec":
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules: empty list; name at least one module or use 'attention'")
        return self

    @property
    def resolved_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


class Checkpointing(_Section):
    eval_steps: int = Field(100, ge=1, description="Evaluate on the validation split every N steps.")
    save_steps: int = Field(100, ge=1, description="Write a checkpoint every N steps.")
    early_stopping_patience: int | None = Field(
        2, ge=1, description="Stop after N evaluations without improvement; null disables."
    )
    keep_best: bool = Field(True, description="The checkpoint with the lowest validation loss is the result.")
    keep_last: int | None = Field(None, ge=1, description="Keep only the last N checkpoints (plus best).")


class DistributedSettings(_Section):
    processes: int = Field(1, ge=1, le=1024, description="Worker processes per node: one per GPU; on CPU, gloo processes.")
    nodes: int = Field(1, ge=1, le=4096, description="Machines: placed by Ray Train with `tunejob run --ray-address`, or the same command on each with its node_rank.")
    node_rank: int = Field(0, ge=0, description="Without Ray: this machine's rank (0 is the main node, which writes the run directory).")
    main_process_ip: str | None = Field(None, description="Without Ray: address of node 0; needed when nodes > 1.")
    main_process_port: int = Field(29500, ge=1, le=65535, description="Rendezvous port on node 0.")
    strategy: Literal["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"] = Field(
        "ddp", description="ddp (the adapter replicated, gradients summed) runs here; fsdp / deepspeed-* generate accelerate configs."
    )
    max_failures: int = Field(3, ge=-1, description="On Ray: restarts of the worker group from the last checkpoint when a worker or node is lost (-1: no limit).")

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes


class WandbSettings(_Section):
    """OpenAI's Weights & Biases integration: the job's metrics go to this W&B project too."""

    project: str = Field(min_length=1, description="W&B project that receives the run.")
    name: str | None = Field(None, description="Display name of the run (OpenAI's default: the job id).")
    entity: str | None = Field(None, description="W&B team or user (default: the key's default entity).")
    tags: list[str] | None = None


class OpenAISettings(_Section):
    """Where an `openai` job runs. The API key is read from the environment, never from this file."""

    base_url: str | None = Field(None, description="Any OpenAI-compatible service, e.g. tunejob serve's http://127.0.0.1:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    organization: str | None = None
    project: str | None = None
    azure_endpoint: str | None = Field(None, description="Azure OpenAI resource endpoint; uses the AzureOpenAI client.")
    api_version: str | None = Field(None, description="Azure OpenAI API version, e.g. 2025-04-01-preview.")

    @field_validator("api_version", mode="before")
    @classmethod
    def _yaml_date(cls, v):
        return v.isoformat() if hasattr(v, "isoformat") else v  # YAML reads a bare 2024-10-21 as a date
    suffix: str | None = Field(None, max_length=64)
    metadata: dict[str, str] | None = Field(None, description="Your key/value tags on the job (up to 15 here: tunejob adds its own idempotency tag).")
    wandb: WandbSettings | None = Field(None, description="Send the job's metrics to Weights & Biases (OpenAI's integrations).")
    poll_interval: float = Field(10.0, gt=0, description="Seconds between status polls.")
    max_retries: int = Field(5, ge=0, le=20, description="Retries on 429 / 5xx / connection errors (Retry-After honoured).")
    timeout: float = Field(60.0, gt=0, description="Seconds per HTTP request.")


class BedrockSettings(_Section):
    """Where a `bedrock` job runs. AWS credentials come from the environment / AWS config."""

    region: str = "us-west-2"
    role_arn: str = Field(description="IAM role Bedrock assumes to read the data and write the output.")
    s3_bucket: str = Field(description="Bucket for the converted data and the job output.")
    s3_prefix: str = "tunejob"
    endpoint_url: str | None = Field(None, description="Override the Bedrock and S3 endpoints (tests: moto server).")
    early_stopping_threshold: float | None = Field(
        None, ge=0, description="Claude 3 Haiku's earlyStoppingThreshold (minimum validation-loss improvement); unset: AWS's default.")
    poll_interval: float = Field(60.0, gt=0)


class JobSpec(_Section):
    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    backend: Literal["local", "openai", "bedrock"] = "local"
    model: str = Field("default", min_length=1, description="'default' (embedded SmolLM2-135M), 'gemma-3-270m', a path, or an API model id.")
    chat_template: str | None = Field(
        None, min_length=1, description="Local: the chat template, for a model without one or to replace its own: a Jinja "
        "file (relative to the spec) or a packaged name: chatml, gemma, llama3.")
    data: DataSpec
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    method: MethodSpec = Field(default_factory=MethodSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantization: Literal["none", "4bit"] = "none"
    checkpointing: Checkpointing = Field(default_factory=Checkpointing)
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    output_dir: Path | None = Field(None, description="Run directory; defaults to runs/<name>.")
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    bedrock: BedrockSettings | None = None

    @model_validator(mode="after")
    def _combinations(self) -> "JobSpec":
        problems = _apply_reinforcement_hyperparameters(self) + _combination_problems(self)
        if problems:
            raise ValueError(" | ".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir if self.output_dir is not None else Path("runs") / self.name

    def resolved_learning_rate(self) -> float:
        lr = self.hyperparameters.learning_rate
        lr = LORA_DEFAULT_LR if lr == "auto" else float(lr)
        multiplier = self.method.rl.learning_rate_multiplier if self.method.type == "reinforcement" else "auto"
        return lr if multiplier == "auto" else lr * multiplier

    def resolved_batch_size(self) -> int:
        """The local backend's effective batch ("auto" resolved)."""
        bs = self.hyperparameters.batch_size
        return LOCAL_AUTO_BATCH_SIZE if bs == "auto" else bs

    def resolved_epochs(self) -> int:
        """The local backend's epochs ("auto" resolved)."""
        ep = self.hyperparameters.epochs
        return LOCAL_AUTO_EPOCHS if ep == "auto" else ep

    def to_yaml(self) -> str:
        """The resolved spec, as saved beside every run."""
        # Only the settings of this job's backend: an `openai` section beside backend local is an error.
        exclude = {"openai"} if self.backend != "openai" else set()
        if self.bedrock is None:
            exclude.add("bedrock")
        if "method" not in self.model_fields_set:
            exclude.add("method")  # a supervised spec saves as it always did
        if self.backend != "local":
            exclude |= {"lora", "distributed"}
        data = self.model_dump(mode="json", exclude=exclude)
        if "lora" in data:
            data["lora"]["alpha"] = self.lora.resolved_alpha
        return yaml.safe_dump(data, sort_keys=False)


# OpenAI's documented range; Bedrock's differ per base model (backends/bedrock_params.py).
OPENAI_RANGES = {"epochs": (1, 50)}
SECRET_KEYS = {"api_key", "apikey", "secret", "token", "password", "aws_secret_access_key", "aws_access_key_id"}


def _apply_reinforcement_hyperparameters(spec: JobSpec) -> list[str]:
    """OpenAI's reinforcement hyperparameters that have a local twin set it (spec/reinforcement.py);
    both set to different values is a problem, not a silent pick."""
    if spec.method.type != "reinforcement" or spec.method.hyperparameters is None:
        return []
    rl, problems = spec.method.hyperparameters, []
    for rl_key, section, key in (("n_epochs", spec.hyperparameters, "epochs"), ("batch_size", spec.hyperparameters, "batch_size"),
                                 ("eval_interval", spec.checkpointing, "eval_steps")):
        value = getattr(rl, rl_key)
        if value == "auto":
            continue
        where = "hyperparameters" if section is spec.hyperparameters else "checkpointing"
        if key in section.model_fields_set and getattr(section, key) != value:
            problems.append(f"method.hyperparameters.{rl_key}: {value} disagrees with {where}.{key}: {getattr(section, key)}; set one of them")
            continue
        setattr(section, key, value)
        if key == "eval_steps" and "save_steps" not in section.model_fields_set:
            section.save_steps = value
    return problems


def _combination_problems(spec: JobSpec) -> list[str]:
    """Settings that are each valid alone but impossible together."""
    hp, problems = spec.hyperparameters, []
    set_fields = spec.model_fields_set
    if spec.backend != "local":
        if spec.quantization != "none":
            problems.append(f"quantization: '{spec.quantization}' applies to backend 'local' only; remove it for '{spec.backend}'")
        if "lora" in set_fields:
            problems.append(f"lora: the {spec.backend} service chooses its own adapter; remove the lora section or use backend 'local'")
        if hp.learning_rate != "auto" and spec.backend == "openai":
            problems.append("hyperparameters.learning_rate: OpenAI takes learning_rate_multiplier instead; set that (or 'auto')")
        if hp.mixed_precision == "bf16":
            problems.append(f"hyperparameters.mixed_precision: the {spec.backend} service picks its own precision; use 'auto' or backend 'local'")
        if hp.packing == "off":
            problems.append(f"hyperparameters.packing: the {spec.backend} service batches its own way; use 'auto' or backend 'local'")
        if spec.model == "default":
            example = "gpt-4o-mini-2024-07-18" if spec.backend == "openai" else "amazon.nova-micro-v1:0:128k"
            problems.append(f"model: name the {spec.backend} base model to fine-tune, e.g. {example}")
        for key, (lo, hi) in (OPENAI_RANGES if spec.backend == "openai" else {}).items():
            value = getattr(hp, key)
            if value != "auto" and not lo <= value <= hi:
                problems.append(f"hyperparameters.{key}: {value} is outside {spec.backend}'s range {lo}-{hi}")
    else:
        if hp.learning_rate_multiplier != "auto":
            problems.append("hyperparameters.learning_rate_multiplier: only for API backends; set learning_rate for 'local'")
        world = spec.distributed.world_size
        if isinstance(hp.batch_size, int) and hp.batch_size % (hp.gradient_accumulation * world):
            per = hp.gradient_accumulation * world
            fixed = per * max(1, round(hp.batch_size / per))
            problems.append(
                f"hyperparameters.batch_size: {hp.batch_size} is not divisible by gradient_accumulation {hp.gradient_accumulation}"
                + (f" x {world} processes" if world > 1 else "")
                + f"; batch_size is the effective batch (micro-batch x accumulation{' x processes' if world > 1 else ''}): set it to {fixed}"
            )
        d = spec.distributed
        # nodes > 1 without main_process_ip is checked when the job runs: on Ray (--ray-address) it needs none
        if d.node_rank >= d.nodes:
            problems.append(f"distributed.node_rank: {d.node_rank} must be below nodes ({d.nodes}); node ranks run 0..{d.nodes - 1}")
    if "distributed" in set_fields and spec.backend != "local":
        problems.append(f"distributed: the {spec.backend} service places its own training; remove the section or use backend 'local'")
    meta = spec.openai.metadata if spec.openai else None
    if meta and (len(meta) > 15 or any(len(k) > 64 or len(v) > 512 for k, v in meta.items()) or "tunejob_tag" in meta):
        problems.append("openai.metadata: up to 15 pairs (OpenAI allows 16; tunejob uses one, tunejob_tag), keys up to 64 characters, values up to 512")
    if "openai" in set_fields and spec.backend != "openai":
        problems.append("openai: settings for backend 'openai'; remove the section or set backend: openai")
    if spec.backend == "bedrock" and spec.bedrock is None:
        problems.append("bedrock: backend 'bedrock' needs a bedrock section with role_arn and s3_bucket")
    if spec.bedrock is not None and spec.backend != "bedrock":
        problems.append("bedrock: settings for backend 'bedrock'; remove the section or set backend: bedrock")
    problems += _method_problems(spec)
    ck = spec.checkpointing
    if ck.keep_best and ck.save_steps % ck.eval_steps:
        fixed = ck.eval_steps * max(1, round(ck.save_steps / ck.eval_steps))
        problems.append(
            f"checkpointing.save_steps: {ck.save_steps} is not a multiple of eval_steps {ck.eval_steps}, so a checkpoint "
            f"could lack a validation loss to rank it by; set save_steps: {fixed}"
        )
    return problems


def _method_problems(spec: JobSpec) -> list[str]:
    if spec.method.type == "reinforcement":
        return _reinforcement_problems(spec)
    if spec.method.type != "dpo":
        return []
    problems = []
    if spec.hyperparameters.train_on == "all":
        problems.append("hyperparameters.train_on: 'all' with method dpo would compare the shared prompt too; "
                        "DPO scores the outputs only, so remove train_on or set it to 'assistant'")
    if spec.backend == "bedrock":
        problems.append("method: dpo runs on backends local and openai; use one of them or method supervised for bedrock")
    if spec.distributed.world_size > 1:
        problems.append("distributed: method dpo trains in one process for now; remove the distributed section")
    return problems


def _reinforcement_problems(spec: JobSpec) -> list[str]:
    problems = []
    if spec.backend == "bedrock":
        problems.append("method: reinforcement runs on backends local and openai (tunejob serve, or a service that still offers it); "
                        "use one of them for bedrock's method supervised")
    if spec.distributed.world_size > 1:
        problems.append("distributed: method reinforcement trains in one process for now; remove the distributed section")
    if spec.hyperparameters.train_on == "all":
        problems.append("hyperparameters.train_on: reinforcement trains on the sampled answers only; remove train_on")
    return problems
