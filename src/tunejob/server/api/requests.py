"""Every request body and query of `tunejob serve`, as pydantic models with OpenAI's limits.

`parse(Model, value)` is the one door: a value that does not fit is a 400 in OpenAI's error shape
whose `param` names the field (`hyperparameters.n_epochs`, `messages.0.role`), never a 5xx. Models
are strict (no "3" for 3, no "true" for true) and refuse unknown fields, as OpenAI does
("Unrecognized request argument supplied"). tunejob's own options (`"tunejob": {...}` in a job's
body) are checked by the job spec's own section models, so a server job and a local run accept
the same values, plus the server's caps (ServerConfig.max_*).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from tunejob.server.errors import ApiError
from tunejob.spec.reinforcement import ReinforcementHyperparameters

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_TYPE_TAGS = {"int", "float", "str", "bool", "dict", "list", "none", "is-instance", "nullable"}


def param_of(loc: tuple) -> str | None:
    """The request field a pydantic error location names, without pydantic's union-member tags
    (`literal['auto']`, `constrained-int`, `function-after[...]`, `[key]`)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or any(c in p for c in "[(-")))]
    return ".".join(parts) or None


def parse(model: type[BaseModel], value: object, prefix: str = ""):
    """`value` validated as `model`, or ApiError(400) naming the first bad field and the fix."""
    if not isinstance(value, dict):
        raise ApiError(400, "The request body must be a JSON object", param=prefix or None)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        err = errors[0]
        param = ".".join(p for p in (prefix, param_of(err["loc"])) if p) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        if err["type"] == "missing":
            raise ApiError(400, f"Missing required parameter: '{param}'", param=param) from None
        # a union ('auto' or an integer in 1..50) fails once per member: say all of them
        msgs = dict.fromkeys(x["msg"] for x in errors if param_of(x["loc"]) == param_of(err["loc"]))
        raise ApiError(400, f"Invalid value for '{param}': {'; or '.join(msgs)} (got {repr(err.get('input'))[:80]})", param=param) from None


# ---------------------------------------------------------------- fine-tuning jobs

Auto = Literal["auto"]
Epochs = Annotated[int, Field(ge=1, le=50)]
Batch = Annotated[int, Field(ge=1, le=256)]
LrMultiplier = Annotated[float, Field(gt=0)]
MetaKey = Annotated[str, StringConstraints(max_length=64)]
MetaValue = Annotated[str, StringConstraints(max_length=512)]


class OpenAIHyperparameters(BaseModel):
    model_config = _STRICT
    n_epochs: Auto | Epochs = "auto"
    batch_size: Auto | Batch = "auto"
    learning_rate_multiplier: Auto | LrMultiplier = "auto"


class SupervisedMethod(BaseModel):
    model_config = _STRICT
    hyperparameters: OpenAIHyperparameters = Field(default_factory=OpenAIHyperparameters)


class DpoHyperparameters(OpenAIHyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=2)] = "auto"


class DpoMethod(BaseModel):
    model_config = _STRICT
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class ReinforcementMethod(BaseModel):
    """OpenAI's FineTuneReinforcementMethod: the grader is checked by tunejob.graders (jobs.py)."""

    model_config = _STRICT
    grader: dict
    hyperparameters: ReinforcementHyperparameters = Field(default_factory=ReinforcementHyperparameters)


class Method(BaseModel):
    model_config = _STRICT
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _trainable(self):
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("method.reinforcement is required with type 'reinforcement': send its grader (and hyperparameters)")
        other = next((t for t in ("supervised", "dpo", "reinforcement") if t != self.type and getattr(self, t) is not None), None)
        if other:
            raise ValueError(f"method.{other} is given but method.type is {self.type!r}; send the {self.type!r} section or set type {other!r}")
        return self


ResourceName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]


class JobResources(BaseModel):
    """`"tunejob": {"resources": {...}}`: what one job needs from the executor. The Ray executor
    asks Ray for them (entrypoint_num_cpus / _num_gpus / _resources); the local executor holds
    them for the job (queued until they are free). Either gives the job as many torch threads as
    CPUs, split among its processes. Over the server's caps (server/api/quota.py): a 400."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None
    gpus: Annotated[float, Field(ge=0, le=1024)] | None = None
    # Ray custom resources a node was started with (`ray start --resources '{"a100": 4}'`)
    custom: Annotated[dict[ResourceName, Annotated[float, Field(gt=0, le=1e6)]], Field(max_length=16)] | None = None


class TunejobOptions(BaseModel):
    """`"tunejob": {...}` in a job body: sections of tunejob's job spec, checked by its models,
    and the job's resources (not part of the spec: where it runs, not what it trains)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    lora: dict | None = None
    quantization: str | None = None
    checkpointing: dict | None = None
    hyperparameters: dict | None = None
    distributed: dict | None = None
    method: dict | None = None  # reinforcement's local settings: completion_tokens, temperature, beta (the KL coefficient)
    resources: JobResources | None = None


class CreateFineTuningJob(BaseModel):
    model_config = _STRICT
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    training_file: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    validation_file: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    hyperparameters: OpenAIHyperparameters | None = None
    method: Method | None = None
    suffix: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^:]*$")] | None = None
    seed: Annotated[int, Field(ge=0, le=2147483647)] | None = None
    metadata: Annotated[dict[MetaKey, MetaValue], Field(max_length=16)] | None = None
    integrations: Annotated[list[dict], Field(max_length=0)] | None = None  # W&B is not wired here
    tunejob: TunejobOptions | None = None

    @property
    def method_type(self) -> str:
        return self.method.type if self.method else "supervised"

    def openai_hyperparameters(self) -> dict:
        """The method's hyperparameters over the deprecated top-level ones, as OpenAI merges them
        (DPO's add beta)."""
        hp = self.hyperparameters.model_dump() if self.hyperparameters else OpenAIHyperparameters().model_dump()
        if self.method_type == "dpo":
            hp["beta"] = "auto"
        if self.method_type == "reinforcement":
            hp.update({k: v for k, v in ReinforcementHyperparameters().model_dump().items() if k not in hp})
        section = getattr(self.method, self.method_type, None) if self.method else None
        if section is not None:
            hp.update(section.hyperparameters.model_dump(exclude_unset=True))
        return hp


class ListQuery(BaseModel):
    """after / limit of OpenAI's list endpoints (limit default 20, 1-100)."""

    model_config = ConfigDict(extra="ignore")  # query strings carry metadata[k]=v, read apart
    after: Annotated[str, StringConstraints(max_length=256)] | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 20


class CheckpointQuery(ListQuery):
    limit: Annotated[int, Field(ge=1, le=100)] = 10  # OpenAI's default for checkpoints


class ListFilesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    purpose: Annotated[str, StringConstraints(max_length=64)] | None = None
    after: Annotated[str, StringConstraints(max_length=256)] | None = None
    limit: Annotated[int, Field(ge=1, le=10_000)] = 10_000
    order: Literal["asc", "desc"] = "desc"


class UploadForm(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    purpose: Literal["fine-tune", "assistants", "batch", "user_data", "vision"]  # OpenAI's uploadable purposes


# ---------------------------------------------------------------- chat completions

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    arguments: str


class ToolCall(BaseModel):
    """OpenAI's ChatCompletionMessageToolCall in an assistant turn: checked here, since a call
    without `function` reached the prompt renderer and failed there with a 500 (issue 31)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _needs_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs 'tool_call_id'")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: dict[Literal["name"], str]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class JsonSchemaFormat(BaseModel):
    """OpenAI's ResponseFormatJsonSchema.json_schema. The schema must be one constrained decoding
    can enforce (engine/grammar.py): a schema it cannot compile is this field's 400, not a 500 later."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: Annotated[dict | None, Field(alias="schema")] = None
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _enforceable(cls, v):
        from tunejob.engine.grammar import problem

        why = problem(v) if v is not None else None
        if why:
            raise ValueError(f"this JSON schema cannot be enforced: {why}")
        return v


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, json_object or json_schema (each enforced, engine/grammar.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self

    def plain(self) -> dict | None:
        """None for text; else {"type", "json_schema": {"schema", ...}} as engine/grammar.py reads it."""
        if self.type == "text":
            return None
        return self.model_dump(by_alias=True, exclude_none=True)


MAX_CHOICES = 8  # n: each choice is a row of its own in the engine's batches (engine/batch.py holds 8 rows a pass)


class ChatCompletionRequest(BaseModel):
    """OpenAI's CreateChatCompletionRequest, the fields a tunejob server can honour or must refuse."""

    model_config = _STRICT
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Annotated[str, StringConstraints(max_length=256)] | Annotated[list[str], Field(max_length=4)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    store: bool | None = None
    metadata: Annotated[dict[MetaKey, MetaValue], Field(max_length=16)] | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_only(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

    def sampling(self) -> dict:
        """Generation arguments. A temperature under 1e-4 is greedy in effect, and taken as 0:
        logits divided by 1e-300 overflow to inf and the sampler fails on NaN (found by fuzzing)."""
        temperature = self.temperature if self.temperature is None or self.temperature >= 1e-4 else 0.0
        return {"max_tokens": self.limit(), "temperature": temperature, "top_p": self.top_p, "seed": self.seed}
