"""Leaving OpenAI fine-tuning with nothing lost (`tunejob migrate`), the last stage: it reads the
account through the backends' client, scores with evaluate's metrics and judge, and answers
locally with the server's inference.

    inventory  -> inventory.take_inventory: every job and fine-tuned model, most urgent first
    record     -> record.record_model: job, spec, curves, files, and the golden set (golden.py)
    retrain    -> retrain.write_retrain_spec: the same job on an open base (+ --distill)
    compare    -> compare.compare_folder: golden answers against a candidate, compare.html
    the old name keeps answering: `tunejob serve --alias NAME=DIR` (server/api/aliases.py)
"""
