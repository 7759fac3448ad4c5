"""Train: the local recipe (trainer), the base model and LoRA adapter, checkpoints and resume,
model shapes and LoRA targets, and several processes through accelerate. Imports data, monitor
and the foundation; the only place trl is touched."""
