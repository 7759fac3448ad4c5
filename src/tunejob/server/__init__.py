"""tunejob serve: a self-hosted server speaking OpenAI's fine-tuning API, training locally."""
