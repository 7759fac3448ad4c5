"""Plain-text renderings of plan and cost results (the --json forms are the dicts themselves)."""

from __future__ import annotations


def _usd(x: float | None) -> str:
    return "-" if x is None else (f"${x:,.2f}" if x >= 0.01 or x == 0 else f"${x:,.4f}")


def render_cost(c: dict) -> str:
    approx = " (approximate token count)" if c.get("tokens_approximate") else ""
    epochs = f"{c['epochs']}{' (auto)' if c.get('epochs_auto') else ''}"
    lines = [
        f"model            {c['model'] or '- (price from --price-per-1m)'}",
        f"examples         {c['examples'] if c.get('examples') is not None else '-'}",
        f"trained tokens   {c['trained_tokens']:,} per epoch{approx}",
        f"epochs           {epochs}",
        f"price            {_usd(c['price_per_1m_usd'])} per 1M tokens ({c['price_source']})",
        f"training cost    {_usd(c['training_cost_usd'])}  = {c['trained_tokens']:,} / 1,000 x {_usd(c['price_per_1m_usd'] / 1000)} x {c['epochs']}",
    ]
    if c.get("examples_capped"):
        lines.append(f"capped           {c['examples_capped']} example(s) over the model's limit are billed at the limit")
    if c.get("inference_cost_per_day_usd") is not None:
        lines.append(f"inference/day    fine-tuned {_usd(c['inference_cost_per_day_usd'])} vs base {_usd(c['base_inference_cost_per_day_usd'])}")
        lines.append(f"inference/month  fine-tuned {_usd(c['inference_cost_per_month_usd'])} vs base {_usd(c['base_inference_cost_per_month_usd'])}")
    for note in c.get("notes", []):
        lines.append(f"note             {note}")
    wd = c.get("openai_wind_down")
    if wd:
        lines.append("OpenAI is winding down self-serve fine-tuning:")
        lines += [f"  {d}  {what}" for d, what in wd["dates"]]
    return "\n".join(lines)


def render_plan(p: dict) -> str:
    lines = [f"backend {p['backend']}, model {p['model']}, {p['train_examples']} training examples"]
    if p["backend"] == "local":
        m = p["memory"]
        lines += [
            f"validation       {p['validation_examples']} examples",
            f"chat template    {p['chat_template']}; answers stop at {' or '.join(p['stop_tokens'])}",
            f"tokens/epoch     {p['tokens_per_epoch']:,} ({p['trained_tokens_per_epoch']:,} trained); per example min {p['tokens_per_example']['min']}, median {p['tokens_per_example']['median']}, max {p['tokens_per_example']['max']}",
        ]
        if p.get("tool_rendering"):
            how = "the chat template's own tool support" if p["tool_rendering"] == "template" else "tunejob's fallback (tools in the system turn, <tool_call>{json}</tool_call> in answers)"
            lines.append(f"function calls   rendered with {how}")
        lines += [
            f"schedule         {p['epochs']} epoch(s), {p['steps']} steps of {p['batch_size']} ({p['micro_batch']} x {p['gradient_accumulation']}), {p['evaluations']} evaluations",
            f"trainable        {p['trainable_parameters']:,} of {p['total_parameters']:,} parameters ({p['trainable_percent']}%)",
            f"memory           {m['total_gb']} GB = weights {m['weights_gb']} + adapter/optimizer {m['adapter_gb']} + activations {m['activations_gb']} + logits {m['logits_gb']} + runtime {m['runtime_gb']}",
        ]
        if p.get("packing"):
            lines.append(f"packing          short sequences share a forward pass, up to {p['packing']} tokens (if the model's packed "
                         "losses match one sequence at a time on the first pack; hyperparameters.packing: off to disable)")
        if p.get("placement"):
            w = p["placement"]
            lines.append(f"placement        {w['workers']} workers = {w['processes_per_node']} per node x {w['nodes']} node(s) (Ray Train with "
                         f"--ray-address: placement {w['ray_strategy']}); each: {w['batch_per_worker']} example(s) of every step "
                         f"({w['micro_batch']} per forward pass), ~{w['memory_per_worker_gb']} GB")
        if p.get("logits_all_positions_gb") is not None and p["logits_all_positions_gb"] > m["logits_gb"]:
            lines.append(f"LM head          at trained positions only ({p['vocabulary']:,}-token vocabulary): logits {m['logits_gb']} GB, "
                         f"not the {p['logits_all_positions_gb']} GB of every position")
        if m.get("fits") is not None:
            lines.append(f"fits             {'yes' if m['fits'] else 'NO'}")
            lines += [f"  - {a}" for a in m.get("advice", [])]
        if p.get("time"):
            t = p["time"]
            lines.append(f"time             ~{t['estimated_seconds'] // 60} min {t['estimated_seconds'] % 60} s on this CPU ({t['measured_gemm_gflops']} GFLOP/s measured)")
    else:
        if "training_cost_usd" in p:
            lines.append(render_cost(p))
        else:
            lines.append(f"cost             {p.get('cost_note')}")
    for w in p.get("warnings", []):
        lines.append(f"warning          {w}")
    return "\n".join(lines)
