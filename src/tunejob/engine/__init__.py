"""Batched decoding: rows that share forward passes and a KV cache (batch.py). Every answer tunejob
generates goes through it: serve's chat thread (server/inference/generation.py) and, in the calling thread,
`tunejob chat`, eval, the demo, the dashboard, migrate's comparison and reinforcement fine-tuning's
rollouts (answers.py). So one set of rules (greedy, temperature, top-p, per-row seeds, stop tokens
and strings, length, tool-call parsing) holds for all of them.

No torch import here: the server's config (and so `import tunejob.cli`) reads ROWS."""

ROWS = 8  # rows per forward pass by default; SmolLM2-135M keeps 46 KB of fp32 KV cache a token: 8 rows of 300 tokens, 110 MB
