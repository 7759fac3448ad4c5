"""tunejob: run LLM fine-tuning jobs (local LoRA/QLoRA, OpenAI, Bedrock) and make them easy to judge."""

from tunejob.errors import TunejobError

__all__ = ["TunejobError"]
