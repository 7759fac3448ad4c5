"""Batched decoding: rows that share forward passes and a KV cache (batch.py). Serve's chat engine
and reinforcement fine-tuning's sampling both decode through it, so one set of sampling rules
(greedy, temperature, top-p, per-row seeds, stop and length) holds for both."""
