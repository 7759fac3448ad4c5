"""`tunejob migrate compare`: the golden set against a candidate, prompt by prompt.

    result = compare_folder(Path("migrations/acme"), Candidate(run_dir=Path("migrations/acme/retrained")))

The candidate is a tunejob run (its best adapter, answering here, greedy) or any
OpenAI-compatible model (OpenAI's replacement, a model behind vLLM or `tunejob serve`), asked at
temperature 0 as the golden set was. For each prompt: exact match, token F1 and ROUGE-L of the
candidate's text against the golden answer, and for tool conversations whether the same tools
were called with the same arguments (parsed JSON, so key order and spacing do not count). An
optional judge (evaluate.judge: answer order drawn per prompt) says which is better; the
candidate's win-or-tie rate comes with a Wilson 95% interval. Latency and USD per 1,000 queries
are given for both sides: the golden side at the source model's fine-tuned price, the candidate
at the price given (a local run has none: its cost is the hardware's).

Figures are split into prompts the candidate was trained on (distilled, or drawn from training)
and prompts it never saw (held out), where retrain.json says which.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tunejob.evaluate.evaluation import exact_match, mean, rouge_l, token_f1
from tunejob.migrate.record import MigrateError

BATCH = 32  # prompts decoded together (engine ROWS at a time), then progress is said


@dataclass(frozen=True)
class Candidate:
    run_dir: Path | None = None
    url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    input_per_1m: float | None = None
    output_per_1m: float | None = None
    concurrency: int = 4

    @property
    def name(self) -> str:
        return str(self.run_dir) if self.run_dir else f"{self.model} at {self.url}"


# ---------------------------------------------------------------- scores (pure)


def _arguments(call: dict):
    raw = (call.get("function") or {}).get("arguments")
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return raw


def tool_match(golden: list[dict] | None, candidate: list[dict] | None) -> dict | None:
    """Same tools called (names, as a multiset) and the same arguments; None when neither called one."""
    golden, candidate = golden or [], candidate or []
    if not golden and not candidate:
        return None
    names = lambda calls: sorted((c.get("function") or {}).get("name") or "" for c in calls)
    pairs = lambda calls: sorted(json.dumps([(c.get("function") or {}).get("name"), _arguments(c)], sort_keys=True) for c in calls)
    return {"same_tools": names(golden) == names(candidate), "same_arguments": pairs(golden) == pairs(candidate)}


def as_text(answer: dict) -> str:
    """An answer as text: its content, and each tool call as name(arguments)."""
    calls = [f"{(c.get('function') or {}).get('name')}({(c.get('function') or {}).get('arguments')})" for c in answer.get("tool_calls") or []]
    return "\n".join(filter(None, [answer.get("content") or "", *calls]))


def score(golden: dict, candidate: dict) -> dict:
    g, c = golden.get("content") or "", candidate.get("content") or ""
    out = {"exact_match": exact_match(c, g), "f1": token_f1(c, g), "rouge_l": rouge_l(c, g)}
    tools = tool_match(golden.get("tool_calls"), candidate.get("tool_calls"))
    if tools is not None:
        out.update(tools)
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def per_1k_queries(prompt_tokens: float | None, completion_tokens: float | None, input_per_1m, output_per_1m) -> float | None:
    from tunejob.plan.cost import inference_cost_per_day

    if None in (prompt_tokens, completion_tokens, input_per_1m, output_per_1m) or prompt_tokens + completion_tokens <= 0:
        return None
    total = prompt_tokens + completion_tokens
    return round(inference_cost_per_day(1000, total, input_per_1m, output_per_1m, completion_tokens / total), 6)


def side_summary(cells: list[dict], input_per_1m=None, output_per_1m=None) -> dict:
    latency = [c["latency_s"] for c in cells if c.get("latency_s") is not None]
    prompt = mean([c["usage"]["prompt_tokens"] for c in cells if c.get("usage")])
    completion = mean([c["usage"]["completion_tokens"] for c in cells if c.get("usage")])
    return {"latency_mean_s": mean(latency), "latency_p50_s": percentile(latency, 0.5), "latency_p95_s": percentile(latency, 0.95),
            "prompt_tokens_mean": prompt, "completion_tokens_mean": completion,
            "usd_per_1k_queries": per_1k_queries(prompt, completion, input_per_1m, output_per_1m)}


def group_summary(rows: list[dict]) -> dict:
    tools = [r["scores"] for r in rows if "same_tools" in r["scores"]]
    return {"prompts": len(rows), **{k: mean([r["scores"][k] for r in rows]) for k in ("exact_match", "f1", "rouge_l")},
            "tool_conversations": len(tools), "same_tools": mean([float(t["same_tools"]) for t in tools]),
            "same_arguments": mean([float(t["same_arguments"]) for t in tools])}


def badness(row: dict) -> tuple:
    """Worst first: tools that differ, then the lowest ROUGE-L, then the lowest F1."""
    s = row["scores"]
    return (s.get("same_arguments", True), s["rouge_l"], s["f1"])


# ---------------------------------------------------------------- the candidate's answers


def answers_from_run(run_dir: Path, items: list[dict], max_tokens: int, say) -> list[dict]:
    """Greedy answers of a run's best adapter, generated here by the batched engine, with tools
    rendered and parsed as `tunejob serve` does; latency is a row's batch start to its last token."""
    from tunejob.engine.answers import answer_all
    from tunejob.engine.chat import ChatRequest
    from tunejob.evaluate.chat import load_for_chat

    model, tokenizer = load_for_chat(run_dir)
    out = []
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        requests = [ChatRequest(messages=i["messages"], tools=i.get("tools") or [], max_tokens=max_tokens, temperature=0.0) for i in chunk]
        for [result] in answer_all(model, tokenizer, requests):
            out.append({"answer": {"content": result.content, "tool_calls": result.tool_calls or None}, "finish_reason": result.finish_reason,
                        "latency_s": result.seconds,
                        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}})
        say(f"candidate: {len(out)}/{len(items)} answered")
    return out


def answers_from_url(candidate: Candidate, items: list[dict], max_tokens: int) -> list[dict]:
    import openai

    from tunejob.migrate.connection import Account
    from tunejob.migrate.golden import ask

    client = Account(base_url=candidate.url, api_key_env=candidate.api_key_env).client(max_retries=5)

    def one(item: dict) -> dict:
        try:
            return ask(client, candidate.model, item, max_tokens, seed=0)
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403, 404):
                raise MigrateError(f"candidate {candidate.model} at {candidate.url}: HTTP {exc.status_code} ({exc.message}); "
                                   "check --candidate-model, --candidate-url and the key") from None
            return {"answer": {"content": None}, "error": f"HTTP {exc.status_code}: {exc.message}"}

    with ThreadPoolExecutor(max_workers=max(1, candidate.concurrency)) as pool:
        return list(pool.map(one, items))


# ---------------------------------------------------------------- the comparison


def _judge(settings, rows: list[dict]) -> dict:
    from tunejob.evaluate.judge import PairToJudge, judge_pairs, wilson_interval

    pairs = [PairToJudge(r["messages"], as_text(r["reference"]) if r.get("reference") else "(no reference answer: judge on the conversation)",
                         as_text(r["golden"]), as_text(r["candidate"])) for r in rows]
    result = judge_pairs(settings, pairs)  # "finetuned" is the candidate, "base" the golden answer
    won = result["wins"] + result["ties"]
    result["win_or_tie_rate"] = won / result["judged"] if result["judged"] else None
    result["win_or_tie_ci95"] = list(wilson_interval(won, result["judged"]))
    return result


def compare_folder(folder: Path, candidate: Candidate, judge=None, max_tokens: int = 1024, limit: int | None = None,
                   say=lambda msg: None) -> dict:
    from tunejob import catalog
    from tunejob.migrate.golden import GoldenLog

    folder = Path(folder)
    golden = GoldenLog(folder / "golden.jsonl").answers()[:limit]
    if not golden:
        raise MigrateError(f"{folder}: no golden answers recorded; run `tunejob migrate record MODEL --out {folder}` first")
    retrain = json.loads((folder / "retrain.json").read_text()) if (folder / "retrain.json").is_file() else {}
    trained = set(retrain.get("distilled", []))
    answers = answers_from_run(candidate.run_dir, golden, max_tokens, say) if candidate.run_dir else answers_from_url(candidate, golden, max_tokens)
    rows = []
    for g, c in zip(golden, answers):
        seen = g["id"] in trained or g.get("source") == "training"
        rows.append({"id": g["id"], "source": g.get("source"), "seen_in_training": seen, "messages": g["messages"], "reference": g.get("reference"),
                     "golden": g["answer"], "candidate": c["answer"], "scores": score(g["answer"], c["answer"]),
                     "golden_latency_s": g.get("latency_s"), "candidate_latency_s": c.get("latency_s"), "candidate_error": c.get("error")})
    info = catalog.lookup(golden[0]["model"])
    prices = (info.finetuned or {}) if info else {}
    result = {
        "folder": str(folder), "source_model": golden[0]["model"], "candidate": candidate.name,
        "all": group_summary(rows), "seen_in_training": group_summary([r for r in rows if r["seen_in_training"]]),
        "not_seen_in_training": group_summary([r for r in rows if not r["seen_in_training"]]),
        "golden_side": side_summary(golden, prices.get("input_per_1m"), prices.get("output_per_1m")),
        "candidate_side": side_summary(answers, candidate.input_per_1m, candidate.output_per_1m),
        "prices": {"golden": f"{info.source}, {info.date}" if info else None,
                   "candidate": "as given" if candidate.input_per_1m is not None else "none given (a local run's cost is its hardware)"},
        "judge": _judge(judge, rows) if judge else None,
        "rows": sorted(rows, key=badness),
    }
    from tunejob.migrate.report import write_report
    from tunejob.train.checkpoint import write_json_atomic

    write_json_atomic(folder / "compare.json", result)
    result["report"] = str(write_report(result, folder / "compare.html"))
    return result
