"""The vLLM engine for real, on a GPU machine with vllm installed (none is lent to this project's CI;
tests/test_serve_vllm.py checks the same path against a stub). About 5 minutes:

    python bench/vllm_gpu_check.py --out bench/results/vllm_gpu_check.json

1. start `vllm serve BASE --enable-lora` (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) on 127.0.0.1,
   BASE being tunejob's embedded SmolLM2-135M (or --model);
2. start `tunejob serve --engine vllm --vllm-url ...` with the same base as its default;
3. fine-tune on the Sales Companion set through the official openai SDK (a few steps) and wait for
   "succeeded": the adapter must be in vLLM's /v1/models by then;
4. chat with the fine-tuned model and the base, plain and streamed, and 8 streams at once;
   print the answers, the greedy answer of tunejob's local engine for the same adapter beside
   vLLM's (bf16 on the GPU against fp32: they may part after a few tokens), and tokens/s.
Exit 0 when every step worked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402
from serve_latency import DATA, KEY, MESSAGES, start_server, stream_load  # noqa: E402
from tunejob.server.run import free_port, wait_until_up  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="base model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SystemExit("vllm is not installed here: pip install vllm (on a machine with a GPU)") from None
    from openai import OpenAI

    from tunejob.train.models import default_model_path

    model = args.model or str(default_model_path())
    report: dict = {"date": time.strftime("%Y-%m-%d"), "model": model}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vport, port = free_port(), free_port()
        vllm_log = tmp / "vllm.log"
        vllm_proc = subprocess.Popen([str(Path(sys.executable).with_name("vllm")), "serve", model, "--host", "127.0.0.1",
                                      "--port", str(vport), "--enable-lora", "--max-lora-rank", "64", "--max-loras", "4"],
                                     env=dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True"),
                                     stdout=vllm_log.open("wb"), stderr=subprocess.STDOUT)
        server = None
        try:
            wait_until_up(f"http://127.0.0.1:{vport}/health", vllm_proc, timeout=600)
            server = start_server(tmp / "data", model, port, tmp / "serve.log", ["--engine", "vllm", "--vllm-url", f"http://127.0.0.1:{vport}"])
            c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)
            f = c.files.create(file=open(DATA, "rb"), purpose="fine-tune")
            job = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 1, "batch_size": 4},
                                            extra_body={"tunejob": {"hyperparameters": {"max_steps": 6, "max_seq_len": 512}}})
            while (job := c.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
                time.sleep(1)
            report["job"] = job.status
            vllm_models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{vport}/v1/models").read())["data"]
            report["vllm_models_after_success"] = [{"id": m["id"], "parent": m.get("parent")} for m in vllm_models]
            ft = job.fine_tuned_model
            report["answers"] = {}
            for name in (ft, "default"):
                plain = c.chat.completions.create(model=name, messages=MESSAGES, max_tokens=48, temperature=0)
                streamed = "".join(p.choices[0].delta.content or "" for p in c.chat.completions.create(
                    model=name, messages=MESSAGES, max_tokens=48, temperature=0, stream=True) if p.choices)
                report["answers"][name] = {"model_field": plain.model, "plain": plain.choices[0].message.content, "streamed": streamed}
            report["streams"] = [stream_load(f"http://127.0.0.1:{port}/v1", KEY, ft, n, 4, 128) for n in (1, 8)]
            report["local_engine_same_adapter"] = _local_answer(model, tmp / "data" / "jobs" / job.id / "run" / "best")
        finally:
            for proc in (server, vllm_proc):
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=60)
        report["vllm_log_tail"] = vllm_log.read_text()[-1500:]
    publish(report, args.out)
    ok = report.get("job") == "succeeded" and any(m["parent"] for m in report["vllm_models_after_success"]) \
        and all(a["plain"] and a["streamed"] for a in report["answers"].values()) and not any(s["failures"] for s in report["streams"])
    raise SystemExit(0 if ok else 1)


def _local_answer(model: str, adapter: Path) -> str:
    """tunejob's local engine's greedy answer for the same adapter (fp32), beside vLLM's."""
    from tunejob.evaluate.chat import load_for_chat
    from tunejob.server.inference import completion

    m, tok = load_for_chat(adapter, base=model)
    return completion.complete(m, tok, MESSAGES, "local", max_tokens=48, temperature=0)["choices"][0]["message"]["content"]


if __name__ == "__main__":
    main()
