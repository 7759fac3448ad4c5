"""`tunejob demo`: the README's main job, end to end on the embedded model.

Trains the packaged demo spec (resources/demo.yaml on resources/sales_companion.jsonl), then asks the base
model and the fine-tuned one the same question, so the effect of the job is visible at once.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from tunejob.spec import load_spec


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def demo_spec_path() -> Path:
    return Path(str(resources.files("tunejob").joinpath("resources/demo.yaml")))


def run_demo(output_dir: Path, question: str, overrides: list[str]) -> dict:
    from tunejob.evaluate.chat import answer, load_for_chat
    from tunejob.train.trainer import train

    spec = load_spec(demo_spec_path(), [f"output_dir={output_dir}", *overrides])
    summary = train(spec)
    system = "You are Sales Companion, an assistant for the account executives at Northwind Software. Be concise, specific and practical; use the account notes you are given."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    answers = {}
    for label, target in (("base", None), ("fine_tuned", summary["run_dir"])):
        model, tokenizer = load_for_chat(target)
        answers[label] = answer(model, tokenizer, messages)
        del model
    _say(f"\nbest checkpoint: {summary['best_checkpoint']} (step {summary['best_step']}, validation loss {summary['best_valid_loss']:.4f})")
    _say(f"trained {summary['trained_tokens']:,} assistant tokens ({summary['tokens_seen']:,} seen) in {summary['wall_time_s']:.0f} s, {summary['tokens_per_second']:.0f} tokens/s")
    from tunejob.monitor.report import write_report

    html_path, png = write_report(Path(summary["run_dir"]))
    _say(f"report: {html_path} (loss chart {png})")
    _say(f"next: tunejob export {summary['run_dir']} --ollama {summary['run_dir']}/ollama   (GGUF + Modelfile for Ollama, llama.cpp)")
    _say(f"\nQ: {question}\n\n--- base model ---\n{answers['base']}\n\n--- fine-tuned ---\n{answers['fine_tuned']}\n")
    return {"summary": summary, "question": question, "answers": answers, "report": str(html_path)}
