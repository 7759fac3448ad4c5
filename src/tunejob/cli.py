"""The `tunejob` command: a thin map from command names to library functions.

Each command parses its options, calls one importable function, and prints. Data goes to stdout
(reports, JSON), status to stderr. Any TunejobError becomes its message on stderr and exit code 2;
an unexpected exception is one line too (TUNEJOB_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunejob.errors import TunejobError
from tunejob.server import config as server_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run LLM fine-tuning jobs and judge them: validate, plan, train, watch, report.")


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("--verbose", help="Also show the libraries' own warnings, logs and progress bars.")] = False,
) -> None:
    if verbose:
        os.environ["TUNEJOB_VERBOSE"] = "1"  # child processes (serve's jobs, --nproc workers) inherit it


def _add_subcommands() -> None:
    """Commands kept in their own modules: the data commands, grading, migration."""
    from tunejob.cli_data import split, validate
    from tunejob.cli_grade import grade
    from tunejob.cli_migrate import app as migrate_app

    app.command()(validate)
    app.command()(split)
    app.command("grade")(grade)
    app.add_typer(migrate_app, name="migrate")


_add_subcommands()
SERVE = server_config.ServerConfig  # `tunejob serve`'s defaults: the dataclass's own (server/config.py)
Executor = Enum("Executor", {"local": "local", "ray": "ray"}, type=str)
ChatDtype = Enum("ChatDtype", {"float32": "float32", "bfloat16": "bfloat16", "auto": "auto"}, type=str)
ChatEngine = Enum("ChatEngine", {"auto": "auto", "local": "local", "llama.cpp": "llama.cpp", "vllm": "vllm"}, type=str)
GgufType = Enum("GgufType", {"f16": "f16", "q8_0": "q8_0", "f32": "f32"}, type=str)


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="The job spec.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec field: key.sub=value (repeatable).")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume/--no-resume", help="Continue from the last checkpoint (default: when one exists).")] = None,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Worker processes on this node (sets distributed.processes); launched through accelerate.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Run as a Ray Train job on this Ray cluster (auto, HEAD:6379 or ray://HEAD:10001): distributed.processes x nodes workers, placed and restarted by Ray.")] = None,
) -> None:
    """Run a fine-tuning job; prints the summary as JSON on stdout."""
    from tunejob.train import distributed
    from tunejob.runner import run_job
    from tunejob.spec import load_spec

    overrides = list(set_ or []) + ([f"distributed.processes={nproc}"] if nproc else [])
    spec = load_spec(spec_path, overrides)
    if ray_address and spec.backend != "local":
        raise TunejobError(f"--ray-address: backend '{spec.backend}' trains on the provider's machines; drop --ray-address")
    if ray_address:
        from tunejob.train.ray_train import run_on_ray

        summary = run_on_ray(spec, spec_path, overrides, resume, ray_address)
    elif spec.backend == "local" and spec.distributed.world_size > 1 and not distributed.in_worker():
        summary = distributed.run_workers(spec, spec_path, overrides, resume)
    else:
        summary = run_job(spec, resume=resume)
    if not distributed.in_worker():  # the launching process prints the summary once, for all workers
        print(json.dumps(summary, indent=2))


@app.command("distributed-config")
def distributed_config(
    spec_path: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="The job spec (its distributed section).")],
    out: Annotated[Path, typer.Option(help="Where to write the accelerate config.")] = Path("accelerate_config.yaml"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec field: key.sub=value (repeatable).")] = None,
    layer_class: Annotated[Optional[str], typer.Option(help="FSDP: the decoder block class to wrap (default LlamaDecoderLayer).")] = None,
) -> None:
    """Write the accelerate config (DDP, FSDP or DeepSpeed ZeRO) for the spec, checked by accelerate's own classes."""
    from tunejob.train.distributed import write_accelerate_config
    from tunejob.spec import load_spec

    path = write_accelerate_config(load_spec(spec_path, set_), out, layer_class)
    print(path)
    _err(f"run it on each node: accelerate launch --config_file {path} --machine_rank N YOUR_SCRIPT.py")


@app.command()
def cost(
    model: Annotated[Optional[str], typer.Option(help="API model id, e.g. gpt-4o-mini-2024-07-18 (or give --price-per-1m).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Training JSONL to count.")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Tokens per epoch, instead of --data.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (default: OpenAI's auto rule from the example count).")] = None,
    price_per_1m: Annotated[Optional[float], typer.Option("--price-per-1m", help="Training price in USD per 1M tokens (overrides the table).")] = None,
    queries_per_day: Annotated[Optional[float], typer.Option(help="Inference load, for the daily serving cost.")] = None,
    tokens_per_query: Annotated[Optional[float], typer.Option(help="Prompt + answer tokens per query.")] = None,
    output_fraction: Annotated[float, typer.Option(help="Share of a query's tokens that are the answer.")] = 0.25,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Training cost (tokens/1,000 x price per 1K x epochs) and fine-tuned inference cost."""
    from tunejob.plan.planner import cost_report
    from tunejob.plan.render import render_cost

    result = cost_report(model, data, tokens, epochs, price_per_1m, queries_per_day, tokens_per_query, output_fraction)
    print(json.dumps(result, indent=2) if as_json else render_cost(result))


@app.command()
def plan(
    spec_path: Annotated[Path, typer.Argument(metavar="JOB.yaml")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec field: key.sub=value.")] = None,
    gpu_memory: Annotated[Optional[float], typer.Option(help="GPU memory in GB: estimate for CUDA and say whether it fits.")] = None,
    price_per_1m: Annotated[Optional[float], typer.Option("--price-per-1m")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Everything before the job runs: data, tokens, steps, cost or memory/time, parameters."""
    from tunejob.plan.planner import plan_job
    from tunejob.plan.render import render_plan
    from tunejob.spec import load_spec

    result = plan_job(load_spec(spec_path, set_), gpu_memory, price_per_1m)
    print(json.dumps(result, indent=2) if as_json else render_plan(result))


@app.command()
def diagnose(
    target: Annotated[Path, typer.Argument(metavar="RUN_DIR|metrics.jsonl")],
    as_json: Annotated[bool, typer.Option("--json", help='{"verdict": KIND, "findings": [...]} on stdout.')] = False,
) -> None:
    """Read the loss curves: healthy, overfitting, flat, spikes, divergence, not converged."""
    from tunejob.monitor.report import diagnose_run, load_run

    result = diagnose_run(load_run(target))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"verdict: {result['verdict']}")
    for f in result["findings"]:
        print(f"- {f['kind']}: {f['message']}\n  what to do: {f['advice']}")


@app.command()
def report(target: Annotated[Path, typer.Argument(metavar="RUN_DIR")]) -> None:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/loss.png."""
    from tunejob.monitor.report import write_report

    html_path, png = write_report(target)
    print(html_path)
    print(png)


@app.command()
def watch(
    target: Annotated[str, typer.Argument(metavar="RUN_DIR|JOB_ID", help="A local run directory, or an API job id from `tunejob jobs`.")],
    interval: Annotated[float, typer.Option(help="Seconds between reads of metrics.jsonl (local runs).")] = 1.0,
    timeout: Annotated[Optional[float], typer.Option(help="Give up after this many seconds (local runs).")] = None,
) -> None:
    """Follow a run live; re-attaches to an API job where the last watch left off."""
    if Path(target).is_dir():
        from tunejob.monitor.watch import watch_run

        print(json.dumps(watch_run(Path(target), interval, timeout), indent=2))
        return
    from tunejob.runner import watch_job

    print(json.dumps(watch_job(target), indent=2))


@app.command()
def jobs(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the API jobs submitted from this machine (the job store under TUNEJOB_HOME)."""
    from tunejob.backends.jobstore import JobStore

    records = JobStore().list()
    if as_json:
        print(json.dumps([{k: v for k, v in r.to_dict().items() if k != "spec"} for r in records], indent=2))
        return
    for r in records:
        print(f"{r.id}\t{r.backend}\t{r.status}\t{r.remote_id or '-'}\t{r.name}\t{r.run_dir}")


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(metavar="JOB_ID")]) -> None:
    """Ask the provider to cancel an API job."""
    from tunejob.runner import cancel_job

    print(cancel_job(job_id))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Files, jobs and the SQLite store live here.")] = Path("tunejob-server"),
    api_key: Annotated[Optional[list[str]], typer.Option("--api-key", help="An accepted API key (repeatable; local use: it shows in `ps`). Prefer $TUNEJOB_API_KEYS (comma-separated) or --keys-file.")] = None,
    keys_file: Annotated[Optional[Path], typer.Option(help="File with one API key per line.")] = None,
    default_model: Annotated[str, typer.Option(help="Base model for 'default' and for OpenAI model ids.")] = SERVE.default_model,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="Another base model: NAME=PATH (repeatable).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload.")] = server_config.MAX_UPLOAD_MB,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest JSON request body (chat, job creation); over it: 413.")] = server_config.DEFAULT_BODY_BYTES / 2**20,
    max_epochs: Annotated[int, typer.Option(help="Most epochs one job may ask for.")] = SERVE.max_epochs,
    max_steps: Annotated[int, typer.Option(help="Most optimizer steps one job may run.")] = SERVE.max_steps,
    max_seq_len: Annotated[int, typer.Option(help="Longest max_seq_len one job may ask for (tokens).")] = SERVE.max_seq_len,
    max_processes: Annotated[Optional[int], typer.Option(min=1, help="Most processes (and GPUs, one per process) one job may ask for (default: this machine's GPUs, or its cores without one).")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Largest batch_size one job may ask for (256: OpenAI's own limit).")] = SERVE.max_batch_size,
    train_threads: Annotated[Optional[int], typer.Option(min=1, help="Torch threads of a training job (default: the cores minus chat's share).")] = None,
    chat_threads: Annotated[Optional[int], typer.Option(min=1, help="Torch threads of chat generation (default: a quarter of the cores, at least 1, while a job trains; all when none does).")] = None,
    chat_queue: Annotated[int, typer.Option(min=1, help="Chat requests waiting or generating before new ones get 429.")] = SERVE.chat_queue,
    executor: Annotated[Executor, typer.Option(help="Where jobs train: local (child processes on this machine) or ray (a Ray cluster; the data dir must be shared with its nodes).")] = Executor(SERVE.executor),
    slots: Annotated[int, typer.Option(min=1, help="local: training jobs at once on this machine (one per GPU; each child gets one GPU and its share of the threads).")] = SERVE.slots,
    ray_address: Annotated[Optional[str], typer.Option(help="ray: the cluster: auto (on a node of it), http://HEAD:8265 or ray://HEAD:10001.")] = None,
    node_retries: Annotated[int, typer.Option(min=0, help="Resumes of a job whose run was lost with its node, before the job fails.")] = SERVE.node_retries,
    chat_batch: Annotated[int, typer.Option(min=1, help="Chat requests that share one forward pass (local engine).")] = SERVE.chat_batch,
    chat_dtype: Annotated[ChatDtype, typer.Option(help="Weights chat runs in (local engine): auto = bfloat16 where training's probe finds the device fast in it (answers then follow bf16 rounding), else float32.")] = ChatDtype(SERVE.chat_dtype),
    chat_merged_copies: Annotated[int, typer.Option(min=0, help="Merged copies of adapters chatted with repeatedly, in copies of the base model in --chat-dtype (local engine); 0 never merges.")] = SERVE.chat_merged_copies,
    chat_merge_mb: Annotated[Optional[int], typer.Option(min=0, help="Also cap those copies' memory (MB); 0 never merges. Default: no cap beyond --chat-merged-copies.")] = None,
    chat_compile: Annotated[bool, typer.Option(help="torch.compile chat's forward for models without unmerged adapters (local engine; compiling takes minutes: measure before using).")] = SERVE.chat_compile,
    engine: Annotated[ChatEngine, typer.Option(help="Where chat runs: auto (llama.cpp where there is no GPU and llama-cpp-python is installed, torch for what it cannot run), local (torch, this process, batched), llama.cpp (this process, the model exported to GGUF and run by llama-cpp-python: faster on CPU) or vllm (a running vLLM server, --vllm-url).")] = ChatEngine(SERVE.engine),
    chat_gguf_type: Annotated[GgufType, typer.Option(help="GGUF type the llama.cpp engine converts base models to (once, cached in the data dir): f16, q8_0 (faster, rounder) or f32 (the reference).")] = GgufType(SERVE.chat_gguf_type),
    chat_kv_tokens: Annotated[int, typer.Option(min=64, help="KV cells the llama.cpp engine allocates per base model, for all its rows (the model's context where smaller); longer chats get 400.")] = SERVE.chat_kv_tokens,
    vllm_url: Annotated[Optional[str], typer.Option(help="Base URL of a vLLM server started with --enable-lora (engine vllm), e.g. http://127.0.0.1:8001.")] = None,
    alias: Annotated[Optional[list[str]], typer.Option("--alias", help="Keep an old model name answering: 'ft:...=RUN_DIR' or a migration folder (repeatable).")] = None,
) -> None:
    """Serve OpenAI's fine-tuning API (files, jobs, events, checkpoints, models, chat) on open models."""
    from tunejob.server.run import serve as _serve

    caps = {"max_epochs": max_epochs, "max_steps": max_steps, "max_seq_len": max_seq_len, "max_processes": max_processes,
            "max_batch_size": max_batch_size, "max_body_bytes": int(max_body_mb * 2**20), "chat_batch": chat_batch,
            "chat_dtype": chat_dtype.value, "chat_merged_copies": chat_merged_copies, "chat_merge_mb": chat_merge_mb,
            "chat_compile": chat_compile, "engine": engine.value, "vllm_url": vllm_url, "chat_gguf_type": chat_gguf_type.value,
            "chat_kv_tokens": chat_kv_tokens}
    _serve(host, port, data_dir, api_key or [], keys_file, default_model, model or [], max_upload_mb, caps,
           train_threads=train_threads, chat_threads=chat_threads, chat_queue=chat_queue,
           executor={"executor": executor.value, "slots": slots, "ray_address": ray_address, "node_retries": node_retries}, aliases=alias)


@app.command()
def dashboard(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="Run directories written by `tunejob run`.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (the dashboard has no login, so it listens locally only).")] = 8001,
) -> None:
    """Web dashboard for local runs: live loss charts, diagnosis, checkpoints (chat), compare, upload."""
    from tunejob.server.run import dashboard as _dashboard

    _dashboard(run_dirs, port)


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Run directory (an existing one is resumed).")] = Path("runs/demo"),
    question: Annotated[Optional[str], typer.Option(help="One more question for both models at the end, e.g. 'Prep me for the Globex call.'")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a field of the demo spec.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Also print the whole result as JSON on stdout (it is always written to OUTPUT_DIR/demo.json).")] = False,
) -> None:
    """Fine-tune the embedded SmolLM2-135M on the Sales Companion data, then ask both models facts only the data holds."""
    from tunejob.demo import run_demo

    result = run_demo(output_dir, question, set_ or [])
    if as_json:
        print(json.dumps(result, indent=2))


@app.command()
def chat(
    target: Annotated[str, typer.Argument(metavar="RUN_DIR|CHECKPOINT|JOB_ID|MODEL_ID", help="A local run (its best checkpoint), a checkpoint, or an API job id / fine-tuned model id.")],
    message: Annotated[str, typer.Argument(help="The user message.")],
    system: Annotated[Optional[str], typer.Option(help="System prompt (default: the one every training example of the run began with, if they shared one; --system '' sends none).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 200,
) -> None:
    """Answer with the base model plus the run's adapter: greedy decoding (the most likely token
    each step, no sampling, no repetition penalty), the same as `tunejob eval`."""
    from tunejob.runner import chat_reply

    print(chat_reply(target, message, system, max_new_tokens, say=_err))


GGUFType = Enum("GGUFType", {"f16": "f16", "q8_0": "q8_0", "f32": "f32"}, type=str)


@app.command()
def export(
    target: Annotated[str, typer.Argument(metavar="RUN_DIR|CHECKPOINT")],
    merge: Annotated[Optional[Path], typer.Option("--merge", help="Write the base model with the adapter folded in here (a transformers folder).")] = None,
    gguf: Annotated[Optional[Path], typer.Option("--gguf", metavar="OUT.gguf", help="Write the merged model as one GGUF file (llama.cpp, LM Studio).")] = None,
    ollama: Annotated[Optional[Path], typer.Option("--ollama", metavar="DIR", help="Write DIR/model.gguf and DIR/Modelfile for `ollama create`.")] = None,
    gguf_adapter: Annotated[Optional[Path], typer.Option("--gguf-adapter", metavar="OUT.gguf", help="Write the LoRA adapter alone as GGUF (llama.cpp --lora).")] = None,
    checkpoint: Annotated[str, typer.Option(help="best, or step-N (GGUF outputs).")] = "best",
    type_: Annotated[GGUFType, typer.Option("--type", help="Tensor type of the GGUF weights.")] = GGUFType.f16,
) -> None:
    """Write the fine-tuned model for other runtimes: a merged transformers folder, GGUF, Ollama."""
    if not any((merge, gguf, ollama, gguf_adapter)):
        raise TunejobError("export: say what to write: --gguf OUT.gguf, --ollama DIR, --gguf-adapter OUT.gguf or --merge DIR")
    if merge:
        from tunejob.evaluate.chat import export_merged

        print(export_merged(target, merge))
    if gguf:
        from tunejob.export.gguf_model import export_gguf

        done = export_gguf(target, gguf, checkpoint, type_.value)
        _err(f"{done['checkpoint']} merged, {done['type']}; generation stops at {done['end_of_turn']}")
        print(done["path"])
    if ollama:
        from tunejob.export.modelfile import export_ollama

        done = export_ollama(target, ollama, checkpoint, type_.value)
        _err(done["system"])
        print(done["path"])
        print(done["create"])
    if gguf_adapter:
        from tunejob.export.lora_gguf import export_adapter

        print(export_adapter(target, gguf_adapter, checkpoint, type_.value)["path"])


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="The run directory `tunejob run` wrote.")],
    data: Annotated[Optional[Path], typer.Option(metavar="HELD_OUT.jsonl", help="Held-out chat examples (default: the run's validation split).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint to evaluate (default: the run's best).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest generated answer in tokens.")] = 160,
    limit: Annotated[Optional[int], typer.Option(help="Answer (and judge) only the first N examples; the loss covers all.")] = None,
    judge_base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible endpoint of a judge model, e.g. http://127.0.0.1:8000/v1.")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="The judge model's name at that endpoint.")] = None,
    judge_api_key_env: Annotated[str, typer.Option(help="Environment variable holding the judge endpoint's API key.")] = "OPENAI_API_KEY",
    judge_seed: Annotated[int, typer.Option(help="Seed of the per-example answer order shown to the judge.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print eval.json on stdout instead of the tables.")] = False,
    facts: Annotated[Optional[Path], typer.Option(metavar="FACTS.jsonl", help='Questions the training data answers, one {"question", "expect"} a line: base vs fine-tuned recall.')] = None,
) -> None:
    """Base vs fine-tuned on held-out examples: loss, perplexity, answers, EM / F1 / ROUGE-L, latency, judge."""
    from tunejob.evaluate.evaluation import evaluate_run, render
    from tunejob.evaluate.judge import JudgeError, JudgeSettings

    if (judge_base_url is None) != (judge_model is None):
        raise JudgeError("give both --judge-base-url and --judge-model to use a judge, or neither")
    judge = JudgeSettings(judge_base_url, judge_model, judge_api_key_env, judge_seed) if judge_base_url else None
    result = evaluate_run(run_dir, data, checkpoint, max_new_tokens, limit, judge, facts=facts)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        render(result)


@app.command()
def version() -> None:
    """Print tunejob's version."""
    from importlib.metadata import version as _v

    print(_v("tunejob"))


def main() -> None:
    from tunejob.monitor.quiet import quiet

    if "--verbose" in sys.argv[1:]:  # before quiet() is entered; the callback below only documents it
        os.environ["TUNEJOB_VERBOSE"] = "1"
    try:
        with quiet():
            app()
    except TunejobError as exc:
        _err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("TUNEJOB_DEBUG"):
            raise
        _err(f"internal error: {exc.__class__.__name__}: {exc} (set TUNEJOB_DEBUG=1 for the traceback; please report it)")
        sys.exit(1)


if __name__ == "__main__":
    main()
