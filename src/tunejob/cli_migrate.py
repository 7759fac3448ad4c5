"""`tunejob migrate ...`: the commands of leaving OpenAI fine-tuning, each a thin map onto
tunejob.migrate's functions (see that package for what each does)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Leave OpenAI fine-tuning with nothing lost: inventory, record, retrain, compare.")

BaseUrl = Annotated[Optional[str], typer.Option("--base-url", help="The API (default: $OPENAI_BASE_URL, else OpenAI); any OpenAI-compatible service, tunejob serve included.")]
KeyEnv = Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the API key.")]
Azure = Annotated[Optional[str], typer.Option("--azure-endpoint", help="Azure OpenAI resource endpoint (default: $AZURE_OPENAI_ENDPOINT); api version from $OPENAI_API_VERSION.")]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _account(base_url, api_key_env, azure_endpoint):
    from tunejob.migrate.connection import Account

    return Account(base_url=base_url, api_key_env=api_key_env, azure_endpoint=azure_endpoint)


@app.command()
def inventory(base_url: BaseUrl = None, api_key_env: KeyEnv = "OPENAI_API_KEY", azure_endpoint: Azure = None,
              as_json: Annotated[bool, typer.Option("--json", help="The entries as JSON on stdout.")] = False) -> None:
    """Every fine-tuning job and fine-tuned model this key sees, most urgent first."""
    from tunejob.migrate.inventory import render, take_inventory
    from tunejob.migrate.shutdown import days_left, new_jobs_stop

    entries = take_inventory(_account(base_url, api_key_env, azure_endpoint).client(), say=_say)
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    stop = new_jobs_stop()
    _say(f"OpenAI stops new fine-tuning jobs on {stop} ({days_left(stop)} days); record first: "
         "`tunejob migrate record MODEL --out DIR`")
    print(render(entries))


@app.command()
def record(
    target: Annotated[str, typer.Argument(metavar="MODEL_OR_JOB", help="A fine-tuned model (ft:...), a checkpoint, or a job id (ftjob-...).")],
    out: Annotated[Path, typer.Option("--out", help="The migration folder (an existing one is resumed).")],
    prompts: Annotated[Optional[Path], typer.Option("--prompts", metavar="FILE", help="More prompts to record (JSONL, chat messages; tools kept).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Also record N prompts drawn from the training file.")] = 0,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, max=64, help="Requests in flight at once.")] = 4,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Longest recorded answer.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the drawn prompts and of the requests.")] = 0,
    base_url: BaseUrl = None, api_key_env: KeyEnv = "OPENAI_API_KEY", azure_endpoint: Azure = None,
) -> None:
    """Save a model's job, spec, curves, files and its own answers (the golden set) into a folder."""
    from tunejob.migrate.record import record_model

    account = _account(base_url, api_key_env, azure_endpoint)
    summary = record_model(account.client(), target, out, prompts, samples, concurrency, max_tokens, seed, account.where(), say=_say)
    for problem in summary["problems"]:
        _say(f"warning: {problem}")
    g, last = summary["golden"], summary["last_record"]
    _say(f"{out}: {g['answers']} of {g['prompts']} golden answers recorded ({g['errors']} refused); this run sent {last['requests']} "
         f"request(s) in {last['seconds']} s, {last['rate_limited']} rate-limited")
    print(out)


@app.command()
def retrain(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A migration folder written by `tunejob migrate record`.")],
    model: Annotated[str, typer.Option("--model", help="The open base: default (embedded SmolLM2-135M-Instruct) or a model folder.")],
    distill: Annotated[bool, typer.Option("--distill", help="Also train on the golden answers to prompts outside the training file.")] = False,
    holdout: Annotated[float, typer.Option(min=0, max=0.9, help="--distill: share of those answers kept out of training, for compare.")] = 0.2,
    run: Annotated[bool, typer.Option("--run", help="Train it now (else: tunejob run DIR/retrain.yaml).")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Set a field of retrain.yaml: key.sub=value, e.g. lora.r=32 (repeatable).")] = None,
) -> None:
    """Write DIR/retrain.yaml: the OpenAI job on an open base, its settings mapped (DIR/retrain.json says how)."""
    from tunejob.migrate.retrain import write_retrain_spec

    path, mapping = write_retrain_spec(folder, model, distill, holdout, overrides=set_)
    for name, chosen in mapping["openai"].items():
        _say(f"{name} {chosen['value']} ({chosen['how']})")
    _say(f"tunejob: {json.dumps(mapping['tunejob'])}; {mapping['training_examples']} training + {mapping['distilled_examples']} distilled examples")
    print(path)
    if run:
        from tunejob.runner import run_job
        from tunejob.spec import load_spec

        print(json.dumps(run_job(load_spec(path)), indent=2))


@app.command()
def compare(
    folder: Annotated[Path, typer.Argument(metavar="DIR")],
    candidate: Annotated[Optional[Path], typer.Option("--candidate", metavar="RUN_DIR", help="A tunejob run (its best adapter answers here).")] = None,
    candidate_url: Annotated[Optional[str], typer.Option(help="An OpenAI-compatible endpoint to compare instead.")] = None,
    candidate_model: Annotated[Optional[str], typer.Option(help="The model's name at --candidate-url.")] = None,
    candidate_api_key_env: Annotated[str, typer.Option(help="Environment variable holding --candidate-url's key.")] = "OPENAI_API_KEY",
    candidate_input_per_1m: Annotated[Optional[float], typer.Option(help="Candidate's USD per 1M input tokens, for the cost column.")] = None,
    candidate_output_per_1m: Annotated[Optional[float], typer.Option(help="Candidate's USD per 1M output tokens.")] = None,
    judge_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible endpoint of a judge model.")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="The judge model's name there.")] = None,
    judge_api_key_env: Annotated[str, typer.Option(help="Environment variable holding the judge's key.")] = "OPENAI_API_KEY",
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest candidate answer.")] = 1024,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Compare only the first N golden answers.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The result as JSON on stdout.")] = False,
) -> None:
    """Golden answers against a candidate: exact match, F1, ROUGE-L, tool calls, judge, latency, cost; DIR/compare.html."""
    from tunejob.errors import TunejobError
    from tunejob.evaluate.judge import JudgeSettings
    from tunejob.migrate.compare import Candidate, compare_folder

    if (candidate is None) == (candidate_url is None) or (candidate_url is not None and not candidate_model):
        raise TunejobError("compare: give --candidate RUN_DIR, or --candidate-url URL with --candidate-model NAME")
    if (judge_url is None) != (judge_model is None):
        raise TunejobError("compare: give both --judge-url and --judge-model to use a judge, or neither")
    who = Candidate(candidate, candidate_url, candidate_model, candidate_api_key_env, candidate_input_per_1m, candidate_output_per_1m)
    judge = JudgeSettings(judge_url, judge_model, judge_api_key_env) if judge_url else None
    result = compare_folder(folder, who, judge, max_tokens, limit, say=_say)
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
        return
    for key, label in (("all", "all"), ("seen_in_training", "seen in training"), ("not_seen_in_training", "never seen")):
        s = result[key]
        _say(f"{label}: {s['prompts']} prompts, exact match {s['exact_match']}, F1 {s['f1']}, ROUGE-L {s['rouge_l']}, same tool calls {s['same_arguments']}")
    if result["judge"]:
        j = result["judge"]
        _say(f"judge: candidate wins or ties {j['win_or_tie_rate']} (95% {j['win_or_tie_ci95']}) of {j['judged']}")
    _say(f"latency mean golden {result['golden_side']['latency_mean_s']} s, candidate {result['candidate_side']['latency_mean_s']} s; "
         f"USD per 1,000 queries golden {result['golden_side']['usd_per_1k_queries']}, candidate {result['candidate_side']['usd_per_1k_queries']}")
    print(result["report"])
