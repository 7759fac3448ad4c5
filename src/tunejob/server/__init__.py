"""Server: `tunejob serve` (OpenAI's fine-tuning API on open models) and `tunejob dashboard`.

Four rooms, lowest first; a room imports the ones below it and the server's foundation (config.py:
settings and defaults; errors.py: OpenAI's error object), never one above (tests/test_layout.py):
  jobs/       the job store, its state machine, and running jobs (worker, executors: local, Ray)
  inference/  the chat engine's serve side: queue and thread, weights and merges, vLLM, completions
  api/        OpenAI's HTTP API: one router per resource, request models, limits and quotas
  dashboard/  the web pages over runs and server jobs
app.py puts them together; run.py starts them (`tunejob serve`, `tunejob dashboard`)."""
