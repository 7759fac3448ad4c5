"""Chat on the server: generation (one chat thread fed by a bounded queue, over tunejob.engine's
batches), weights (bases, adapters, merged copies), vllm (chat forwarded to a vLLM server), and
completion (OpenAI's chat.completion object)."""
