"""Server: `tunejob serve` (OpenAI's fine-tuning API: one router per resource, a job worker,
inference for chat) and the dashboard. The top stage: may import every stage below it, and
nothing but cli/runner/demo imports it."""
