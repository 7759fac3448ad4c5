"""OpenAI's HTTP API: one router per resource (files, jobs, models, chat, graders), the request
models (requests), what every route shares (common), and the limits: context length, quotas,
the wrong-key throttle; aliases keep a migrated model's old name."""
