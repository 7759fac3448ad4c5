"""The run report: a loss chart (PNG) and a self-contained HTML page.

The chart is the guide's "most important chart": training loss (raw, faint, and smoothed) and
validation loss against steps, with the best checkpoint and the early stop marked. The HTML
embeds the PNG and the data it was drawn from (a JSON block), the diagnosis, hyperparameters,
data statistics and the compute used; it needs nothing else to open.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import yaml

from tunejob.monitor.diagnose import diagnose, smooth
from tunejob.errors import TunejobError
from tunejob.monitor.metrics import read_metrics


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not metrics_path.is_file():
        raise TunejobError(f"{run_dir}: no metrics.jsonl here; pass a run directory or a metrics.jsonl file")
    base = metrics_path.parent
    records = read_metrics(metrics_path)
    config = yaml.safe_load((base / "config.yaml").read_text()) if (base / "config.yaml").is_file() else {}
    summary = json.loads((base / "summary.json").read_text()) if (base / "summary.json").is_file() else {}
    return {"dir": base, "records": records, "config": config or {}, "summary": summary}


def diagnose_run(run: dict) -> dict:
    hp = run["config"].get("hyperparameters", {})
    epochs = hp.get("epochs") if isinstance(hp.get("epochs"), int) else None
    lr = hp.get("learning_rate") if isinstance(hp.get("learning_rate"), (int, float)) else None
    return diagnose(run["records"], learning_rate=lr, epochs=epochs)


def loss_chart(run: dict, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run["records"]
    rl = any("train_reward_mean" in r for r in records)  # reinforcement: its curves are rewards (higher is better)
    what, (key_t, key_v) = ("reward", ("train_reward_mean", "valid_reward_mean")) if rl else ("loss", ("train_loss", "valid_loss"))
    train = [(r["step"], r[key_t]) for r in records if r.get("kind") == "train" and key_t in r]
    valid = [(r["step"], r[key_v]) for r in records if r.get("kind") == "eval" and key_v in r]
    dpo = any("rewards_margin" in r for r in records)
    fig, axes = plt.subplots(2 if dpo else 1, 1, figsize=(9, 8 if dpo else 4.8), dpi=110, squeeze=False)
    ax = axes[0][0]
    if dpo:
        _reward_chart(axes[1][0], records)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#1f77b4", alpha=0.25, linewidth=1, label=f"training {what} (per step)")
        ax.plot(steps, smooth(list(losses), window=max(5, (len(losses) // 6) | 1)), color="#1f77b4", linewidth=2, label=f"training {what} (smoothed)")
    if valid:
        steps, losses = zip(*valid)
        ax.plot(steps, losses, color="#d62728", marker="o", linewidth=2, label=f"validation {what}")
    summary = run["summary"]
    best = summary.get("best_valid_reward" if rl else "best_valid_loss")
    if summary.get("best_step") is not None and best is not None:
        ax.axvline(summary["best_step"], color="#2ca02c", linestyle="--", linewidth=1)
        ax.plot([summary["best_step"]], [best], marker="*", markersize=16, color="#2ca02c",
                label=f"best checkpoint (step {summary['best_step']}, {best:.4f})")
    if summary.get("stop_reason") == "early_stopping":
        ax.axvline(summary["steps"], color="#7f7f7f", linestyle=":", linewidth=1.5, label=f"early stop (step {summary['steps']})")
    ax.set_xlabel("step")
    ax.set_ylabel("mean grader reward" if rl else "DPO loss (pairs)" if dpo else "loss (assistant tokens)")
    ax.set_title(f"Training vs validation {what}: {run['config'].get('name', run['dir'].name)}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _reward_chart(ax, records: list[dict]) -> None:
    """DPO's reward curves: training margin and accuracy per step, their validation values per eval."""
    for prefix, kind, style in (("", "train", "-"), ("valid_", "eval", "o-")):
        rows = [r for r in records if r.get("kind") == kind and f"{prefix}rewards_margin" in r]
        if rows:
            steps = [r["step"] for r in rows]
            where = "validation" if prefix else "training"
            ax.plot(steps, [r[f"{prefix}rewards_margin"] for r in rows], style, color="#9467bd", label=f"{where} reward margin")
            ax.plot(steps, [r[f"{prefix}rewards_accuracy"] for r in rows], style, color="#ff7f0e", label=f"{where} reward accuracy")
    ax.axhline(0.5, color="#7f7f7f", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("reward margin / accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write RUN_DIR/loss.png and RUN_DIR/report.html; returns their paths."""
    run = load_run(run_dir)
    png = loss_chart(run, run["dir"] / "loss.png")
    verdict = diagnose_run(run)
    data = {
        "train": [{"step": r["step"], "train_loss": r["train_loss"]} for r in run["records"] if r.get("kind") == "train"],
        "eval": [{"step": r["step"], **{k: r[k] for k in ("valid_loss", "valid_reward_mean") if k in r}} for r in run["records"] if r.get("kind") == "eval"],
        "summary": run["summary"], "diagnosis": verdict, "config": run["config"],
    }
    eval_path = run["dir"] / "eval.json"
    if eval_path.is_file():  # written by `tunejob eval`; the report shows it when present
        data["evaluation"] = json.loads(eval_path.read_text())
    out = run["dir"] / "report.html"
    tmp = out.with_name(".report.html.tmp")
    tmp.write_text(_html(run, verdict, base64.b64encode(png.read_bytes()).decode(), data), encoding="utf-8")
    tmp.replace(out)
    return out, png


def _rows(pairs: list[tuple[str, object]]) -> str:
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)


def _eval_section(ev: dict | None) -> str:
    """Base vs fine-tuned from RUN_DIR/eval.json: the metrics, the judge, the first answers."""
    if not ev:
        return ""
    m = ev["models"]
    rows = "".join(
        f"<tr><th>{label}</th><td>{_num(m['base'].get(key))}</td><td>{_num(m['finetuned'].get(key))}</td></tr>"
        for label, key in (("loss (assistant tokens)", "loss"), ("perplexity", "perplexity"), ("mean token accuracy", "mean_token_accuracy"),
                           ("exact match", "exact_match"), ("token F1", "f1"), ("ROUGE-L", "rouge_l"),
                           ("latency (s / answer)", "latency_s"), ("answer length (tokens)", "answer_tokens"), ("tokens / s", "tokens_per_second"))
    )
    cost = ev.get("cost_per_1k_queries_usd")
    if cost:
        rows += f"<tr><th>USD / 1,000 queries</th><td>{_num(cost['base'])}</td><td>{_num(cost['finetuned'])}</td></tr>"
    judge = ev.get("judge")
    verdict = ""
    if judge and judge.get("win_rate") is not None:
        verdict = (f"<p id='eval-judge'>Judge {html.escape(str(judge['model']))}: fine-tuned wins {judge['wins']}, loses {judge['losses']}, "
                   f"ties {judge['ties']}; win rate {judge['win_rate']:.0%} (95% CI {judge['ci95'][0]:.0%}-{judge['ci95'][1]:.0%})</p>")
    answers = "".join(
        f"<tr><td>{html.escape(a['reference'])}</td><td>{html.escape(a['base']['answer'])}</td><td>{html.escape(a['finetuned']['answer'])}</td></tr>"
        for a in ev.get("answers", [])[:10]
    )
    return (f"<h2 id='eval'>Evaluation: base vs fine-tuned</h2><p>{html.escape(Path(ev['checkpoint']).name)} on {ev['examples']} held-out "
            f"example(s) ({html.escape(str(ev['data']))}), {ev['answered']} answered.</p>"
            f"<table><tr><th>metric</th><th>base</th><th>fine-tuned</th></tr>{rows}</table>{verdict}"
            + (f"<table><tr><th>reference</th><th>base</th><th>fine-tuned</th></tr>{answers}</table>" if answers else ""))


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _html(run: dict, verdict: dict, png_b64: str, data: dict) -> str:
    cfg, s = run["config"], run["summary"]
    hp = cfg.get("hyperparameters", {})
    lora = cfg.get("lora", {})
    findings = "".join(
        f"<li class='{html.escape(f['kind'])}'><b>{html.escape(f['kind'])}</b>: {html.escape(f['message'])}<br><i>What to do:</i> {html.escape(f['advice'])}</li>"
        for f in verdict["findings"]
    )
    hyper = _rows([(k, hp.get(k)) for k in ("learning_rate", "epochs", "batch_size", "gradient_accumulation", "warmup", "max_seq_len", "train_on")]
                  + [("lora r / alpha / dropout", f"{lora.get('r')} / {lora.get('alpha')} / {lora.get('dropout')}"),
                     ("target modules", lora.get("target_modules")), ("quantization", cfg.get("quantization")), ("model", cfg.get("model"))])
    data_rows = _rows([("training examples", s.get("train_examples")), ("validation examples", s.get("validation_examples")),
                       ("train file", (cfg.get("data") or {}).get("train"))])
    compute = _rows([("stop reason", s.get("stop_reason")), ("steps", f"{s.get('steps')} of {s.get('total_steps')}"),
                     ("best step / validation loss", f"{s.get('best_step')} / {s.get('best_valid_loss')}"),
                     ("trained (assistant) tokens", s.get("trained_tokens")), ("tokens seen", s.get("tokens_seen")),
                     ("wall time (s)", s.get("wall_time_s")), ("tokens / s", s.get("tokens_per_second")),
                     ("peak memory (MB)", s.get("peak_memory_mb")), ("device", s.get("device")),
                     ("trainable parameters", f"{s.get('trainable_parameters')} of {s.get('total_parameters')}")])
    title = html.escape(f"tunejob report: {cfg.get('name', run['dir'].name)}")
    payload = json.dumps(data).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}th,td{{border:1px solid #ddd;padding:4px 10px;text-align:left}}
th{{background:#f6f6f6;font-weight:600}}li{{margin:0.4em 0}}.verdict{{font-size:1.3em}}
li.overfitting,li.divergence,li.spikes{{color:#a40000}}li.healthy{{color:#006400}}</style></head>
<body><h1>{title}</h1>
<p class="verdict">Diagnosis: <b id="verdict">{html.escape(verdict['verdict'])}</b></p>
<ul id="findings">{findings}</ul>
<img id="loss-chart" alt="training vs validation loss" src="data:image/png;base64,{png_b64}" style="max-width:100%">
<h2>Hyperparameters</h2><table>{hyper}</table>
<h2>Data</h2><table>{data_rows}</table>
<h2>Compute</h2><table>{compute}</table>
{_eval_section(data.get("evaluation"))}
<script type="application/json" id="tunejob-data">{payload}</script>
</body></html>
"""
