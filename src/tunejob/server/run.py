"""Starting the server: keys, configuration, uvicorn."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tunejob.errors import TunejobError
from tunejob.server.config import CHAT_QUEUE


KEYS_ENV = "TUNEJOB_API_KEYS"
# 16 characters from the 64 of a random token are 2^96 keys: at the throttle's 5 wrong keys a
# minute per address (server/api/throttle.py), even a million addresses would need ~1.5e16 years.
MIN_KEY_CHARS = 16


def load_keys(keys: list[str], keys_file: Path | None, environ: dict | None = None) -> set[str]:
    """The accepted keys: $TUNEJOB_API_KEYS (comma-separated), --keys-file (one per line, `#`
    comments), and --api-key. The first two keep keys out of `ps`; --api-key is for local use."""
    environ = os.environ if environ is None else environ
    out = {k.strip() for k in environ.get(KEYS_ENV, "").split(",") if k.strip()}
    if keys:
        print("warning: --api-key shows the key to anyone who can run `ps` on this machine; "
              f"use ${KEYS_ENV} or --keys-file outside local tests", file=sys.stderr, flush=True)
        out |= {k.strip() for k in keys if k.strip()}
    if keys_file is not None:
        try:
            lines = keys_file.read_text().splitlines()
        except OSError as exc:
            raise TunejobError(f"{keys_file}: cannot read the keys file ({exc.strerror or exc})") from None
        out |= {line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")}
    if not out:
        raise TunejobError(f"give at least one API key: set {KEYS_ENV}=KEY1,KEY2, or --keys-file FILE (one per line), "
                           "or --api-key KEY for local use (clients send it as their api_key)")
    short = sorted(len(k) for k in out if len(k) < MIN_KEY_CHARS)
    if short:  # the key itself is never printed: this line may reach a shared log
        raise TunejobError(f"{len(short)} API key(s) shorter than {MIN_KEY_CHARS} characters ({', '.join(map(str, short))}): "
                           "a short key can be guessed; make one with: python -c \"import secrets; print('sk-' + secrets.token_urlsafe(24))\"")
    return out


def serve(host: str, port: int, data_dir: Path, keys: list[str], keys_file: Path | None, default_model: str,
          models: list[str], max_upload_mb: float, caps: dict | None = None, train_threads: int | None = None,
          chat_threads: int | None = None, chat_queue: int = CHAT_QUEUE, executor: dict | None = None, aliases: list[str] | None = None) -> None:
    """`tunejob serve`; `caps` holds ServerConfig's max_epochs / max_steps / max_seq_len, `executor`
    its executor / slots / ray_address / node_retries;
    chat_* and engine settings come in `caps` too."""
    import uvicorn

    from tunejob.server.app import ServerConfig, create_app

    extra = {}
    for item in models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TunejobError(f"--model {item!r}: write it as NAME=PATH")
        extra[name] = path
    if (caps or {}).get("engine") == "vllm" and not (caps or {}).get("vllm_url"):
        raise TunejobError("--engine vllm: give --vllm-url, the base URL of a vLLM server started with --enable-lora "
                           "(e.g. --vllm-url http://127.0.0.1:8001)")
    if (caps or {}).get("engine") == "llama.cpp":
        try:
            import llama_cpp  # noqa: F401  (checked before the server starts, not at the first chat)
        except ImportError:
            raise TunejobError("--engine llama.cpp needs llama-cpp-python: install the export extra: make setup / pip install -e .[export]") from None
    if aliases and (caps or {}).get("engine") == "vllm":
        raise TunejobError("--alias answers with adapters this process loads; use it with --engine local")
    from tunejob.server.api.aliases import parse_aliases

    config = ServerConfig(data_dir=Path(data_dir), api_keys=load_keys(keys, keys_file), default_model=default_model,
                          aliases=parse_aliases(aliases or []), self_url=self_url(host, port),
                          models=extra, max_upload_bytes=int(max_upload_mb * 2**20), train_threads=train_threads,
                          chat_threads=chat_threads, chat_queue=chat_queue, **(caps or {}), **(executor or {}))
    where = f", jobs on the Ray cluster at {config.ray_address or 'auto'}" if config.executor == "ray" else ""
    print(f"tunejob serve: http://{host}:{port}/v1 (data in {data_dir}, {len(config.api_keys)} key(s){where})", file=sys.stderr, flush=True)
    app = create_app(config)
    uvicorn_server = _uvicorn_server()(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    uvicorn_server.on_exit = lambda: _stop_chats(app)
    uvicorn_server.run()


def self_url(host: str, port: int) -> str:
    """The server's API as seen from itself: a wildcard address (0.0.0.0, ::) is reached on loopback."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def _stop_chats(app) -> None:
    from tunejob.server.errors import ApiError
    engine = getattr(app.state, "chat_engine", None)
    if engine is not None and engine.closing is None:
        n = engine.shutdown(ApiError(503, "The server is shutting down; retry the request once it is back, or on another server",
                                     type="server_error", code="server_shutting_down"))
        print(f"tunejob serve: stopping; {n} chat generation(s) answered with 503", file=sys.stderr, flush=True)


def _uvicorn_server():
    import uvicorn  # here, not at the top: `import tunejob.cli` stays light

    class Server(uvicorn.Server):
        """uvicorn's server, which on SIGTERM / SIGINT first answers the chats in flight: its
        graceful shutdown waits for open requests, and a long generation (a 40,000-token prompt
        prefilling) held a stopped server for over a minute. Training children still checkpoint:
        the worker stops them at the app's shutdown, as before."""

        on_exit = staticmethod(lambda: None)

        def handle_exit(self, sig, frame) -> None:
            self.on_exit()
            super().handle_exit(sig, frame)

    return Server


def dashboard(run_dirs: list[Path], port: int) -> None:
    """`tunejob dashboard`: the web pages over local run directories, on 127.0.0.1 only (no login;
    requests naming another Host are refused, see dashboard.local_dashboard)."""
    import uvicorn

    from tunejob.server.dashboard.views import local_dashboard

    missing = [str(d) for d in run_dirs if not (d / "metrics.jsonl").is_file() and not (d / "config.yaml").is_file()]
    if missing:
        raise TunejobError(f"not a run directory (no metrics.jsonl or config.yaml): {', '.join(missing)}; pass what `tunejob run` wrote, e.g. runs/demo")
    print(f"tunejob dashboard: http://127.0.0.1:{port}/ ({len(run_dirs)} run(s))", file=sys.stderr, flush=True)
    uvicorn.run(local_dashboard(list(run_dirs), port), host="127.0.0.1", port=port, log_level="warning")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (for a server started next; tests, benchmarks, scripts)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Return once GET url answers; raise RuntimeError if `proc` (the server) exits first or
    `timeout` seconds pass, so a server that crashes at start fails at once, not at the deadline."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode} before {url} answered") from None
            if time.time() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.2)
