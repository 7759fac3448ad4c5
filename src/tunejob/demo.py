"""`tunejob demo`: the README's main job, end to end on the embedded model, with proof of learning.

Trains the packaged demo spec (resources/demo.yaml: the Sales Companion conversations plus a fact
set, resources/demo_train.jsonl and demo_validation.jsonl), then asks the base model and the
fine-tuned one questions whose answers only the training data holds (resources/demo_facts.jsonl:
Globex's champion, CFO, seat count and competitor, worded unlike any training example) and prints
both answers side by side with a verdict checked by string match.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from tunejob.spec import load_spec


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _resource(name: str) -> Path:
    return Path(str(resources.files("tunejob").joinpath(f"resources/{name}")))


def demo_spec_path() -> Path:
    return _resource("demo.yaml")


def demo_facts_path() -> Path:
    return _resource("demo_facts.jsonl")


def _short(text: str, width: int = 70) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 3] + "..."


def _show_recall(result: dict) -> None:
    _say("\nFacts only the training data holds (asked in new words):")
    for row in result["rows"]:
        _say(f"\nQ: {row['question']}   (a right answer names: {' or '.join(row['expect'])})")
        for side, label in (("base", "base      "), ("finetuned", "fine-tuned")):
            mark = "right" if row[side]["right"] else "wrong"
            _say(f"  {label} [{mark}] {_short(row[side]['answer'])}")


def _next_steps(run_dir: Path, facts: Path) -> None:
    _say("\nNext:")
    for command, what in ((f"tunejob report {run_dir}", "the loss chart and diagnosis as HTML"),
                          (f"tunejob dashboard {run_dir}", "the same run in the browser"),
                          (f'tunejob chat {run_dir} "Who is the CFO at Globex?"', "ask it yourself"),
                          (f"tunejob eval {run_dir} --facts {facts} --limit 5", "base vs fine-tuned: loss, answers, the same fact score"),
                          (f"tunejob export {run_dir} --ollama {run_dir}/ollama", "GGUF + Modelfile for Ollama and llama.cpp"),
                          (f"tunejob export {run_dir} --merge merged/", "a full model plain transformers loads")):
        _say(f"  {command:<78} # {what}")


def run_demo(output_dir: Path, question: str | None, overrides: list[str]) -> dict:
    import torch

    from tunejob.evaluate.chat import answer, run_checkpoint
    from tunejob.evaluate.tuned import loaded_as_trained
    from tunejob.evaluate.facts import load_facts, recall, verdict
    from tunejob.monitor.report import write_report
    from tunejob.train.trainer import train

    spec = load_spec(demo_spec_path(), [f"output_dir={output_dir}", *overrides])
    summary = train(spec)
    run_dir = Path(summary["run_dir"])
    _say(f"\nbest checkpoint: {summary['best_checkpoint']} (step {summary['best_step']}, validation loss {summary['best_valid_loss']:.4f})")
    _say(f"trained {summary['trained_tokens']:,} assistant tokens ({summary['tokens_seen']:,} seen) in {summary['wall_time_s']:.0f} s, {summary['tokens_per_second']:.0f} tokens/s")
    html_path, png = write_report(run_dir)
    _say(f"report: {html_path} (loss chart {png})")

    # One model, loaded as training ran it and as `tunejob eval` loads it (so both report the same
    # fact score): the adapter is switched off for the base's answers.
    facts = load_facts(demo_facts_path())
    with loaded_as_trained(spec, run_dir, run_checkpoint(run_dir), torch.device("cpu")) as (model, tokenizer, _):
        result = recall(model, tokenizer, facts)
        _show_recall(result)
        extra = None
        if question:
            messages = facts[0].messages()[:-1] + [{"role": "user", "content": question}]
            with model.disable_adapter():
                base = answer(model, tokenizer, messages)
            extra = {"question": question, "base": base, "fine_tuned": answer(model, tokenizer, messages)}
            _say(f"\nQ: {question}\n\n--- base model ---\n{extra['base']}\n\n--- fine-tuned ---\n{extra['fine_tuned']}")
    _say(f"\nVerdict: {verdict(result)}.")
    _next_steps(run_dir, demo_facts_path())
    out = {"summary": summary, "facts": result, "question": extra, "report": str(html_path)}
    # The whole result for scripts (and `tunejob demo --json`), not 100 lines on the terminal after the verdict
    (run_dir / "demo.json").write_text(json.dumps(out, indent=2))
    return out
