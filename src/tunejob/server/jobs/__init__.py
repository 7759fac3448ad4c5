"""Fine-tuning jobs on the server: their store (SQLite + files), their life (lifecycle, outcome),
and their runs (worker; executor: local child processes, ray_cluster: Ray jobs; run_records)."""
