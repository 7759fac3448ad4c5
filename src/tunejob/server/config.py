"""`tunejob serve`'s settings and their defaults, in one place: the CLI's options (cli.py), the
server (api.py, app.py) and the chat engine (generation.py) all read them from here, and
tests/test_defaults.py checks that `tunejob serve --help` shows the same. No FastAPI or torch
here: `import tunejob.cli` stays light."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tunejob import engine

CHAT_QUEUE = 8  # chat requests waiting or generating before 429 (server/inference/generation.py)
CHAT_BATCH = engine.ROWS  # rows per forward pass (engine/__init__.py)
CHAT_DTYPE = "auto"  # bfloat16 where training's probe (train/precision.py) finds the device fast in it, else float32
MAX_UPLOAD_MB = 512
# A chat body of 16 MB is ~4M tokens of text, 500x the default model's 8,192-token context; a job
# body is a few kB. Parsed, 16 MB is 0.04 s as one string but ~3 s and ~190 MB as small lists
# (measured on this 2-core machine): a body past PARSE_INLINE_BYTES is parsed off the event loop.
DEFAULT_BODY_BYTES = 16 * 2**20
PARSE_INLINE_BYTES = 1 << 20


@dataclass
class ServerConfig:
    data_dir: Path
    api_keys: set[str]
    default_model: str = "default"
    models: dict[str, str] = field(default_factory=dict)  # extra base models: name -> path
    max_upload_bytes: int = MAX_UPLOAD_MB * 2**20
    max_body_bytes: int = DEFAULT_BODY_BYTES  # every JSON body (uploads have max_upload_bytes)
    # Caps on what one job may ask of this machine, whatever its body says (tunejob's extras
    # included): 50 epochs is OpenAI's own n_epochs limit; 10,000 steps of a 135M model on CPU
    # is about a day; 4,096 tokens per example keeps one sequence's activations under ~2 GB.
    max_epochs: int = 50
    max_steps: int = 10_000
    max_seq_len: int = 4096
    # Processes one job may start (distributed.processes; GPUs, one per process). None: this
    # machine's GPUs, or its cores on a host without one (server/api/quota.py). 256 examples a step is
    # OpenAI's own batch_size limit; tunejob.hyperparameters.batch_size had none.
    max_processes: int | None = None
    max_batch_size: int = 256
    train_threads: int | None = None  # torch threads of a training child (None: train.threads.budget)
    chat_threads: int | None = None  # torch threads of chat generation while a job trains (None: the budget's)
    chat_queue: int = CHAT_QUEUE
    executor: str = "local"  # where jobs train: local child processes, or ray (server/jobs/executor.py)
    slots: int = 1  # local: training jobs at once on this machine (one per GPU)
    ray_address: str | None = None  # ray: the cluster (auto, http://HEAD:8265, ray://HEAD:10001)
    node_retries: int = 2  # resumes of a run lost with its node before the job fails
    chat_batch: int = CHAT_BATCH
    chat_dtype: str = CHAT_DTYPE  # or float32, bfloat16
    chat_merged_copies: int = 2  # merged copies of adapters chatted with repeatedly, in copies of the base (server/inference/weights.py); 0: never
    chat_merge_mb: int | None = None  # an optional memory cap on those copies as well (the budget before --chat-merged-copies)
    chat_compile: bool = False  # torch.compile chat's forward (server/inference/weights.py); off until measured to pay
    # "auto" (llama.cpp where there is no GPU and llama-cpp-python is installed, torch for the rest:
    # server/inference/engine_choice.py), "local" (torch, this process), "llama.cpp" (this process,
    # llama.cpp's forward: server/inference/llama.py) or "vllm" (chat forwarded to a vLLM server: server/inference/vllm.py)
    engine: str = "auto"
    chat_gguf_type: str = "f16"  # engine llama.cpp: the GGUF type the base is converted to (f16, q8_0 or f32)
    # engine llama.cpp: the KV cells a base's context holds for all its rows together, allocated when
    # the base loads (the model's context where smaller). Not the model's context as such: an 8B model
    # with a 128k context would take 16 GB in f16 before its first token. A chat longer gets OpenAI's 400.
    chat_kv_tokens: int = 16384
    vllm_url: str | None = None  # the vLLM server's base URL, e.g. http://127.0.0.1:8001 (engine "vllm")
    aliases: dict[str, str] = field(default_factory=dict)  # old model name -> run dir (server/api/aliases.py)
    # This server's own API, e.g. http://127.0.0.1:8000/v1 (run.serve sets it): score_model graders
    # sent to /v1/fine_tuning/alpha/graders/run ask their model here (server/api/graders.py).
    self_url: str | None = None
