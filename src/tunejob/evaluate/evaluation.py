"""Evaluating a run: the base model against the fine-tuned one on held-out chat examples.

    result = evaluate_run(Path("runs/sales-companion"), max_new_tokens=160, limit=20)
    # RUN_DIR/eval.json; result["models"]["finetuned"]["loss"] < result["models"]["base"]["loss"]

    held-out examples (the run's validation split, as training drew it, or --data)
      -> loss / perplexity / mean token accuracy on the trained (assistant) tokens, both models
      -> greedy answers to each prompt (messages up to the last assistant turn), both models
      -> exact match, token F1, ROUGE-L against that assistant turn; latency and answer tokens
      -> cost per 1,000 queries (API models in the price table) or tokens/s (local models)
      -> optional pairwise judge (judge.py)

One model is loaded: the base is the same weights with the adapter switched off, so both sides
see exactly the same base. The loss goes through trainer.evaluate with training's micro-batch,
so it equals the eval record metrics.jsonl holds for the same checkpoint.
"""

from __future__ import annotations

import collections
import math
import re
import string
import sys
import time
from pathlib import Path

from tunejob.train import checkpoint as ckpt
from tunejob.errors import DataError, ModelError
from tunejob.data.sequences import plain_messages

SIDES = ("base", "finetuned")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- answer metrics (pure)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: harmonic mean of precision and recall of the normalised tokens (a bag)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) from Google's rouge-score, without stemming.
    Its tokenizer keeps only [a-z0-9] runs, so text in other scripts scores 0."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str] | None:
    """The conversation up to its last assistant message, and that message's text; None if the
    example has no assistant message."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return None
    plain = plain_messages(messages)
    return plain[:last], plain[last]["content"]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- cost (pure)


def cost_per_1k_queries(model: str, prompt_tokens: float, answer_tokens: dict[str, float]) -> dict | None:
    """USD per 1,000 queries for the base and the fine-tuned model, each at its own price and its
    own mean answer length; None when the model has no inference prices (local models)."""
    from tunejob import catalog
    from tunejob.plan.cost import inference_cost_per_day

    info = catalog.lookup(model)
    if info is None or not info.finetuned or not info.base:
        return None
    out = {"source": f"{info.source}, {info.date}"}
    for side, prices in (("base", info.base), ("finetuned", info.finetuned)):
        total = prompt_tokens + answer_tokens[side]
        fraction = answer_tokens[side] / total if total else 0.0
        out[side] = round(inference_cost_per_day(1000, total, prices["input_per_1m"], prices["output_per_1m"], fraction), 6)
    return out


# ---------------------------------------------------------------- data


def load_run_spec(run_dir: Path):
    from tunejob.spec import parse_spec

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ModelError(f"{run_dir}: no config.yaml here; pass the directory `tunejob run` wrote")
    return parse_spec(config.read_text(), source=str(config))


def held_out_examples(spec, data: Path | None) -> list[dict]:
    """--data validated and loaded, else the run's validation split exactly as training drew it."""
    from tunejob.data.dataset import load_examples
    from tunejob.data.splits import load_splits
    from tunejob.data.validate import validate_file

    if data is None:
        for path in filter(None, [spec.data.train, spec.data.validation]):
            if not Path(path).is_file():
                raise DataError(f"{path}: the run's data file is gone (paths are relative to where `tunejob run` ran); pass --data HELD_OUT.jsonl")
        return load_splits(spec)[1]
    report = validate_file(data, min_examples=1)
    if not report.ok:
        first = next(p for ps in report.problems.values() for p in ps if p.severity == "error")
        raise DataError(f"{data}:{first.line or ''}: {first.message} ({report.errors} error(s)); run `tunejob validate {data}` for all of them")
    return load_examples(data)


# ---------------------------------------------------------------- models


def _side(model, side: str):
    """A context in which `model` is the base (adapter off) or the fine-tuned model."""
    import contextlib

    return model.disable_adapter() if side == "base" else contextlib.nullcontext()


def loss_scores(model, tokenizer, spec, examples: list[dict], device) -> dict:
    from tunejob.data.sequences import encode_examples
    from tunejob.train.batches import make_collator, micro_batch_size
    from tunejob.train.loss import LossPath, evaluate
    from tunejob.train.packing import choose_packing

    hp = spec.hyperparameters
    seqs, _ = encode_examples(tokenizer, examples, hp.max_seq_len, hp.train_on)
    if not seqs:
        raise DataError("no held-out example has a trained token within max_seq_len; check the data")
    # Training's micro-batch: padding differs with the batching, and so would the last digits.
    micro = micro_batch_size(spec.resolved_batch_size(), hp.gradient_accumulation, 1, device)
    collate, loss_path = make_collator(tokenizer.pad_token_id), LossPath()
    # and training's packing (train/packing.py: the same check, so the same passes as its validation)
    pack = choose_packing(hp.packing, spec.method.type, model, seqs, device, loss_path, say=lambda m: None)
    out = {"scored_examples": len(seqs), "scored_tokens": sum(s.trained_tokens for s in seqs)}
    for side in SIDES:
        with _side(model, side):
            loss, accuracy = evaluate(model, seqs, collate, micro, device, loss_path=loss_path, pack_tokens=pack)
        # exp() overflows a float past 709; a loss that high means "no idea" either way
        out[side] = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "mean_token_accuracy": accuracy}
    return out


def answer_examples(model, tokenizer, items: list[tuple[list[dict], str]], max_new_tokens: int,
                    say=_say) -> tuple[list[dict], dict]:
    """Greedy answers of both models to each prompt, batched (engine/answers.py), with their
    scores, latency (a row's batch start to its last token) and length; and each side's wall time."""
    from tunejob.engine.answers import greedy

    if items:  # warm-up, untimed: the first forward pays one-off setup that would bias one side
        greedy(model, tokenizer, [items[0][0]], max_tokens=1)
    rows = [{"prompt": prompt, "reference": reference,
             "prompt_tokens": len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False))}
            for prompt, reference in items]
    walls = {}
    for side in SIDES:
        with _side(model, side):
            t0 = time.perf_counter()
            results = greedy(model, tokenizer, [prompt for prompt, _ in items], max_new_tokens)
            walls[side] = wall = time.perf_counter() - t0
        for row, result in zip(rows, results):
            text, reference = result.content or "", row["reference"]
            row[side] = {"answer": text, "seconds": result.seconds, "tokens": result.completion_tokens,
                         "exact_match": exact_match(text, reference), "f1": token_f1(text, reference), "rouge_l": rouge_l(text, reference)}
        say(f"answered {len(items)} prompts with the {side} model in {wall:.1f} s")
    return rows, walls


def summarise_answers(rows: list[dict], walls: dict) -> dict:
    """Scores and speed per side; tokens / s over the side's wall time (its answers decode together)."""
    out = {}
    for side in SIDES:
        cells = [r[side] for r in rows]
        seconds, tokens = walls.get(side), sum(c["tokens"] for c in cells)
        out[side] = {
            "exact_match": mean([c["exact_match"] for c in cells]), "f1": mean([c["f1"] for c in cells]),
            "rouge_l": mean([c["rouge_l"] for c in cells]), "latency_s": mean([c["seconds"] for c in cells]),
            "answer_tokens": mean([c["tokens"] for c in cells]), "tokens_per_second": tokens / seconds if seconds else None,
        }
    return out


# ---------------------------------------------------------------- the whole evaluation


def evaluate_run(
    run_dir: Path,
    data: Path | None = None,
    checkpoint: Path | None = None,
    max_new_tokens: int = 160,
    limit: int | None = None,
    judge=None,
    say=_say,
    facts: Path | None = None,
) -> dict:
    """Evaluate base vs fine-tuned on held-out examples; writes and returns RUN_DIR/eval.json.

    The loss covers every held-out example; `limit` caps only the answered (and judged) ones,
    which cost max_new_tokens decoding steps each, twice.
    """
    import torch

    from tunejob.evaluate.chat import run_checkpoint
    from tunejob.evaluate.tuned import loaded_as_trained

    run_dir = Path(run_dir)
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    if max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    spec = load_run_spec(run_dir)
    checkpoint = run_checkpoint(checkpoint if checkpoint is not None else run_dir)
    examples = held_out_examples(spec, data)
    judge_client = None
    if judge is not None:  # a missing API key fails now, not after minutes of generation
        from tunejob.evaluate.judge import make_client

        judge_client = make_client(judge)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    say(f"evaluating {checkpoint} against its base on {len(examples)} held-out example(s), on {device}")
    torch.manual_seed(spec.hyperparameters.seed)
    with loaded_as_trained(spec, run_dir, checkpoint, device) as (model, tokenizer, precision):
        if examples and "preferred_output" in examples[0]:  # preference pairs: ranking share instead of the chat loss
            from tunejob.evaluate.preference import answer_items, preference_scores

            scores, items = preference_scores(model, tokenizer, spec, examples, device), answer_items(examples)[:limit]
        else:
            scores = loss_scores(model, tokenizer, spec, examples, device)
            items = [pr for pr in (prompt_and_reference(ex["messages"]) for ex in examples) if pr is not None][:limit]
        rows, walls = answer_examples(model, tokenizer, items, max_new_tokens, say)
        fact_recall = _fact_recall(model, tokenizer, facts, say) if facts is not None else None
    answers = summarise_answers(rows, walls)
    models = {side: {**scores[side], **answers[side]} for side in SIDES}
    mean_prompt = mean([r["prompt_tokens"] for r in rows]) or 0.0
    cost = cost_per_1k_queries(spec.model, mean_prompt, {s: models[s]["answer_tokens"] or 0.0 for s in SIDES})

    result = {
        "run_dir": str(run_dir), "checkpoint": str(checkpoint), "step": ckpt.read_state(checkpoint).get("step") if (checkpoint / "state.json").is_file() else None,
        "model": spec.model, "device": str(device), "mixed_precision": precision,
        "data": str(data) if data else "validation split of the run",
        "examples": len(examples), "scored_examples": scores["scored_examples"], "scored_tokens": scores["scored_tokens"],
        "answered": len(rows), "max_new_tokens": max_new_tokens, "mean_prompt_tokens": mean_prompt,
        "models": models,
        "cost_per_1k_queries_usd": cost,
        "compute": None if cost else {s: {"tokens_per_second": models[s]["tokens_per_second"], "latency_s": models[s]["latency_s"]} for s in SIDES},
        "judge": None, "answers": rows, "facts": fact_recall,
    }
    if judge is not None:
        from tunejob.evaluate.judge import PairToJudge, judge_pairs

        say(f"judging {len(rows)} pair(s) with {judge.model} at {judge.base_url}")
        pairs = [PairToJudge(r["prompt"], r["reference"], r["base"]["answer"], r["finetuned"]["answer"]) for r in rows]
        result["judge"] = judge_pairs(judge, pairs, judge_client)
    ckpt.write_json_atomic(run_dir / "eval.json", result)
    return result


def _fact_recall(model, tokenizer, path: Path, say) -> dict:
    from tunejob.evaluate.facts import load_facts, recall, verdict

    facts = load_facts(path)
    say(f"asking {len(facts)} fact question(s) from {path}")
    model.eval()
    result = recall(model, tokenizer, facts)
    say(verdict(result))
    return {"file": str(path), **result}


# ---------------------------------------------------------------- terminal rendering


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


METRIC_ROWS = [
    ("loss (assistant tokens)", "loss", 4, "lower"), ("perplexity", "perplexity", 3, "lower"),
    ("mean token accuracy", "mean_token_accuracy", 4, "higher"), ("exact match", "exact_match", 3, "higher"),
    ("token F1", "f1", 3, "higher"), ("ROUGE-L", "rouge_l", 3, "higher"),
    ("latency (s / answer)", "latency_s", 3, "lower"), ("answer length (tokens)", "answer_tokens", 1, None),
    ("tokens / s", "tokens_per_second", 1, "higher"),
    # preference pairs (evaluate/preference.py)
    ("preferred output ranked higher", "preference_share", 3, "higher"), ("reward accuracy (vs base)", "reward_accuracy", 3, "higher"),
    ("DPO loss (vs base)", "dpo_loss", 4, "lower"),
]


def render(result: dict, console=None, show_answers: int = 5) -> None:
    """The metrics side by side, a few answers, cost or compute, and the judge's verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = result["models"]
    table = Table(title=f"base vs fine-tuned ({Path(result['checkpoint']).name}, {result['examples']} held-out, {result['answered']} answered)")
    for col in ("metric", "base", "fine-tuned", "better"):
        table.add_column(col, justify="left" if col in ("metric", "better") else "right")
    for label, key, digits, direction in METRIC_ROWS:
        b, f = m["base"].get(key), m["finetuned"].get(key)
        if key not in m["base"] and key not in m["finetuned"]:
            continue  # the other data kind's metric (chat loss vs preference ranking)
        better = "" if direction is None or b is None or f is None or b == f else ("fine-tuned" if (f < b) == (direction == "lower") else "base")
        table.add_row(label, _fmt(b, digits), _fmt(f, digits), better)
    cost = result.get("cost_per_1k_queries_usd")
    if cost:
        table.add_row("USD / 1,000 queries", f"{cost['base']:.4f}", f"{cost['finetuned']:.4f}", "")
    console.print(table)
    if not cost:
        console.print("local model: no per-query price; the compute it takes is tokens / s above "
                      f"(on {result['device']}, greedy, {result['max_new_tokens']} new tokens at most)")
    answers = Table(title="answers", show_lines=True)
    for col in ("prompt", "reference", "base", "fine-tuned"):
        answers.add_column(col, overflow="fold")
    for row in result["answers"][:show_answers]:
        last_user = next((msg["content"] for msg in reversed(row["prompt"]) if msg["role"] == "user"), "")
        answers.add_row(last_user, row["reference"], row["base"]["answer"], row["finetuned"]["answer"])
    if result["answers"]:
        console.print(answers)
    facts = result.get("facts")
    if facts:
        console.print(f"facts ({facts['file']}): base {facts['base_right']}/{facts['facts']}, fine-tuned {facts['finetuned_right']}/{facts['facts']}")
    j = result.get("judge")
    if j:
        rate = "-" if j["win_rate"] is None else f"{j['win_rate']:.0%}"
        unparsed = f", {j['unparsed']} unparsed" if j["unparsed"] else ""
        console.print(f"judge {j['model']}: fine-tuned wins {j['wins']}, loses {j['losses']}, ties {j['ties']}{unparsed}: "
                      f"win rate {rate} (95% CI {j['ci95'][0]:.0%}-{j['ci95'][1]:.0%})")
