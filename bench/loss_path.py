"""The cost of computing the loss through the model's own forward (train/loss.py path "keep")
against the old decoder + head by hand ("fast", which skipped family logit transforms) and full
logits ("full"), on the demo's model and LoRA config, alternating paths in one process.

    python bench/loss_path.py --rounds 3 --steps 6 --out bench/results/loss_path.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402

PATHS = ("fast", "keep", "full")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps of 4 sequences per path per round")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from tunejob.data.dataset import load_examples
    from tunejob.data.sequences import encode_examples
    from tunejob.spec import parse_spec
    from tunejob.train.adapter import add_lora, load_model
    from tunejob.train.batches import as_batch, batch_order, make_collator
    from tunejob.train.loss import choose_path, forward_loss
    from tunejob.train.models import default_model_path, load_tokenizer

    model_path = args.model or str(default_model_path())
    spec = parse_spec(f"model: {model_path}\ndata: {{train: x.jsonl}}\nlora: {{r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}}\n")
    tok = load_tokenizer(model_path)
    data = Path(__file__).resolve().parents[1] / "src" / "tunejob" / "resources" / "sales_companion.jsonl"
    seqs, _ = encode_examples(tok, load_examples(data), 512)
    model = add_lora(spec, load_model(spec, model_path, torch.device("cpu")))
    model.train()
    collate = make_collator(tok.pad_token_id)
    order = batch_order([len(s.input_ids) for s in seqs], 4, 42, 0)
    chosen = choose_path(model, as_batch(collate, seqs[:1], torch.device("cpu"))).path

    def step_seconds(path: str, batches: list[list[int]]) -> tuple[float, int]:
        tokens, t0 = 0, time.perf_counter()
        for ids in batches:
            for i in ids:  # one sequence per forward pass, as the trainer does on CPU
                batch = as_batch(collate, [seqs[i]], torch.device("cpu"))
                loss, n, _ = forward_loss(model, batch, path)
                (loss / n).backward()
                tokens += len(seqs[i].input_ids)
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, tokens

    step_seconds("fast", order[:1])  # warm-up
    rates: dict[str, list[float]] = {p: [] for p in PATHS}
    for r in range(args.rounds):
        batches = order[1 + r * args.steps : 1 + (r + 1) * args.steps]
        for path in PATHS:
            seconds, tokens = step_seconds(path, batches)
            rates[path].append(tokens / seconds)
    figures = {"model": model_path, "threads": torch.get_num_threads(), "chosen_path": chosen,
               "tokens_per_second": {p: {"median": round(statistics.median(v), 1), "rounds": [round(x, 1) for x in v]} for p, v in rates.items()},
               "keep_vs_fast": round(statistics.median(rates["keep"]) / statistics.median(rates["fast"]), 3),
               "full_vs_fast": round(statistics.median(rates["full"]) / statistics.median(rates["fast"]), 3)}
    publish(figures, args.out)


if __name__ == "__main__":
    main()
