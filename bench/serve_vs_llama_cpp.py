"""One chat stream through `tunejob serve --engine llama.cpp` against llama.cpp's own loop on the
same GGUF, in alternating rounds, so that this VM's drift (its read bandwidth moved from 30.7 to
37.7 GB/s between two runs minutes apart) falls on both sides alike.

    python bench/serve_vs_llama_cpp.py --rounds 6 --requests 4 --out bench/results/serve_vs_llama_cpp.json
    python bench/serve_vs_llama_cpp.py --model /path/to/tiny --rounds 2 --requests 1 --max-tokens 4   # smoke

Each round: `--requests` greedy completions of serve_latency's prompt in llama-cpp-python's `Llama`
in this process (its loop, its prefix reuse: no HTTP), and `--requests` streamed chats of the same
prompt through the server with the official SDK (serve_latency.stream_load: one stream); the order
flips every round (ABBA). Neither side runs while the other does. `--system-words N` puts a system
message of N words first on both sides (a product's long system prompt). Reported: tokens/s of each
side per round, their ratio, serve's time to first token (its first request, before the prompt is
cached, and each round's median), the median ratio, and the weight-read bound (the GGUF's bytes over
a 1 GiB read pass) before and after.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from report import publish, read_bandwidth
from serve_latency import KEY, MESSAGES, llama_cpp_completions, start_server, stream_load
from tunejob.server.run import free_port


def itself(llm, prompt: str, requests: int, max_tokens: int) -> float:
    """llama.cpp's side of a round, in tokens/s."""
    tokens, seconds = llama_cpp_completions(llm, prompt, requests, max_tokens)
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--kind", default="f16", help="GGUF type, both sides")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=4, help="requests each side sends a round")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--system-words", type=int, default=0, help="a system message of this many words first (a product's long "
                    "system prompt), on both sides")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from llama_cpp import Llama

    from tunejob.server.inference.gguf_files import GgufFiles
    from tunejob.train.models import default_model_path, load_tokenizer

    model = args.model or str(default_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        path = GgufFiles(Path(tmp) / "gguf", args.kind, log=lambda m: None).base(model)
        words = " ".join(f"rule{i} applies to every call." for i in range(args.system_words // 5))
        messages = ([{"role": "system", "content": words}] if words else []) + MESSAGES
        tokenizer = load_tokenizer(model)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        llm = Llama(str(path), n_ctx=4096, n_threads=os.cpu_count(), verbose=False)
        port = free_port()
        proc = start_server(Path(tmp) / "data", model, port, Path(tmp) / "server.log",
                            ["--engine", "llama.cpp", "--chat-gguf-type", args.kind])
        url = f"http://127.0.0.1:{port}/v1"
        try:
            itself(llm, prompt, 1, 8)
            cold = stream_load(url, KEY, "default", 1, 1, 8, messages=messages)  # warm-up: both have the prompt cached after it
            bound_before = read_bandwidth() / path.stat().st_size
            rounds = []
            for r in range(args.rounds):
                sides = {}
                for side in (("itself", "serve") if r % 2 == 0 else ("serve", "itself")):
                    if side == "itself":
                        sides[side] = itself(llm, prompt, args.requests, args.max_tokens)
                    else:
                        load = stream_load(url, KEY, "default", 1, args.requests, args.max_tokens, messages=messages)
                        if load["failures"]:
                            raise SystemExit(f"serve failed: {load['failures']}")
                        sides[side], ttft = load["aggregate_tokens_per_s"], load["ttft_p50_s"]
                rounds.append({**{k: round(v, 1) for k, v in sides.items()}, "ratio": round(sides["serve"] / sides["itself"], 3),
                               "serve_ttft_p50_s": ttft})
            bound_after = read_bandwidth() / path.stat().st_size
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "model": model, "kind": args.kind,
              "max_tokens": args.max_tokens, "requests_per_round": args.requests,
              "prompt_tokens": len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), "serve_ttft_first_request_s": cold["ttft_p50_s"],
              "rounds": rounds,
              "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 3),
              "serve_tokens_per_s_median": statistics.median(r["serve"] for r in rounds),
              "itself_tokens_per_s_median": statistics.median(r["itself"] for r in rounds),
              "weight_read_bound_tokens_per_s": [round(bound_before, 1), round(bound_after, 1)]}
    publish(report, args.out)


if __name__ == "__main__":
    main()
