"""Evaluate: chatting with a base model plus an adapter, merged export, base-vs-fine-tuned
evaluation and the optional pairwise judge. Imports plan, train, data, monitor and the foundation."""
