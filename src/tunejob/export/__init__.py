"""Export: a trained run as files other runtimes load (GGUF for llama.cpp and Ollama)."""
