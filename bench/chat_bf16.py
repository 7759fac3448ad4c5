"""How far bf16 chat strays from fp32 on one model: a correctness figure, not a timing one (it may
run on a busy machine).

    python bench/chat_bf16.py --out bench/results/chat_bf16.json
    python bench/chat_bf16.py --model /path/to/tiny --prompts 2 --max-tokens 8      # smoke size

For each prompt (the Sales Companion set's user turns): fp32 greedy generate() writes the reference
answer; the bf16 model then reads the same tokens (teacher forcing), and at every answer position
we compare its logits with fp32's: top-1 agreement, the largest |logit difference|, and at each
disagreement the fp32 top-2 gap (small gaps are the near-ties rounding decides). Last, tunejob's
chat engine answers in bf16 and we count the tokens it shares with the fp32 answer before they part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "src" / "tunejob" / "resources" / "sales_companion.jsonl"


def prompts(n: int) -> list[list[dict]]:
    out = []
    for line in DATA.read_text().splitlines():
        msgs = json.loads(line)["messages"]
        user = next(m for m in msgs if m["role"] == "user")
        out.append([{"role": "user", "content": user["content"]}])
        if len(out) == n:
            break
    return out


def engine_answers(model: str, asks: list[list[dict]], max_tokens: int, dtype: str) -> list[list[int]]:
    """The chat engine's greedy tokens for every prompt at once (one batch), in `dtype`."""
    from tunejob.server.inference.generation import Engine, EngineOptions, Generation
    from tunejob.engine.chat import ChatRequest
    from tunejob.train import threads

    async def run() -> list[list[int]]:
        engine = Engine(threads.budget(), options=EngineOptions(dtype=dtype), log=lambda m: None)
        loop = asyncio.get_running_loop()
        gens = [Generation(model, None, ChatRequest(messages=m, max_tokens=max_tokens, temperature=0), False, loop) for m in asks]
        for g in gens:
            engine.submit(g)
        out = []
        for g in gens:
            while (event := await g.next_event(3600)) and event[0] not in ("done", "error"):
                pass
            out.append(event[1])
        engine.stop()
        return out

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from tunejob.train.models import default_model_path, load_tokenizer

    model = args.model or str(default_model_path())
    tok = load_tokenizer(model)
    fp32 = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    asks = prompts(args.prompts)
    agree = total = 0
    max_diff, gaps_at_disagreement, references = 0.0, [], []
    for messages in asks:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            seq = fp32.generate(ids, max_new_tokens=args.max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=tok.pad_token_id)
            a, b = fp32(seq).logits[0, ids.shape[1] - 1:-1].float(), bf16(seq).logits[0, ids.shape[1] - 1:-1].float()
        references.append(seq[0, ids.shape[1]:].tolist())
        top2 = a.topk(2).values
        same = a.argmax(-1) == b.argmax(-1)
        agree, total = agree + int(same.sum()), total + len(same)
        max_diff = max(max_diff, float((a - b).abs().max()))
        gaps_at_disagreement += [round(float(g), 5) for g in (top2[:, 0] - top2[:, 1])[~same]]
    shared = []
    for ref, got in zip(references, engine_answers(model, asks, args.max_tokens, "bfloat16")):
        text_ref = tok.decode(ref, skip_special_tokens=True).strip()
        k = next((i for i in range(len(ref)) if not got.content.startswith(tok.decode(ref[: i + 1], skip_special_tokens=True).strip())), len(ref))
        shared.append({"tokens_before_parting": k, "of": len(ref), "same_answer": got.content == text_ref})
    publish({"date": time.strftime("%Y-%m-%d"), "model": model, "prompts": len(asks), "max_tokens": args.max_tokens,
             "teacher_forced_top1_agreement": round(agree / max(1, total), 4), "positions": total,
             "max_abs_logit_diff": round(max_diff, 4), "fp32_top2_gap_where_bf16_disagrees": sorted(gaps_at_disagreement),
             "engine_bf16_vs_fp32_greedy": shared}, args.out)


if __name__ == "__main__":
    main()
