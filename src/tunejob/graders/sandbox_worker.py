"""The child process of python graders (sandbox.py starts it as `python -I sandbox_worker.py`).
Standard library only: -I leaves out the environment's PYTHONPATH, so tunejob may not be importable.

Protocol, one JSON object a line on private copies of stdin/stdout (the grader's own print() goes
to stderr, and its input() reads nothing, so neither can break the protocol):
  in:  {"source": ..., "memory_mb": N}          out: {"ready": true} or {"error": "..."}
  in:  {"sample": {...}, "item": {...}}         out: {"score": 0.5} or {"error": "..."}  (repeated)

Before the grader's code runs: the address space (RLIMIT_AS) and file sizes are capped, and the socket module's
constructors raise, so `requests`, `urllib` and `socket.create_connection` fail. That is
best-effort, not a jail: code that imports `_socket` directly, or ctypes, gets through. OpenAI runs
python graders on its own servers in a sandbox without network; here they run as this user, in a
scratch directory, with an environment that holds no secrets (sandbox.py builds it).
"""

import json
import math
import numbers
import os
import resource
import socket
import sys
import traceback


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled for python graders (OpenAI's graders have none either)")


def _cut_network() -> None:
    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _no_network()

    socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
        setattr(socket, name, _no_network)


def _last_line(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def _score(value) -> dict:
    # The guide: grade returns a float; "any other result (exception, invalid float value, etc.)"
    # scores 0. Integers and numpy numbers are numbers and count. A bool is refused: `return a == b`
    # reads as a score, but OpenAI expects a float, and a grader should fail here as it would there.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return {"error": f"grade returned {type(value).__name__} {repr(value)[:60]}, not a float; return a number such as 1.0"}
    value = float(value)
    if not math.isfinite(value):
        return {"error": f"grade returned {value}, not a finite float"}
    return {"score": value}


def main() -> None:
    reader = os.fdopen(os.dup(0), "r", encoding="utf-8")
    writer = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    sys.stdin, sys.stdout = open(os.devnull, encoding="utf-8"), sys.stderr

    def send(message: dict) -> None:
        writer.write(json.dumps(message) + "\n")
        writer.flush()

    setup = json.loads(reader.readline())
    limit = int(setup["memory_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # no file over 1 GiB (OpenAI gives graders 1 GB of disk); this also bounds the stderr log
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**30, 2**30))
    _cut_network()
    namespace = {"__name__": "grader"}
    try:
        exec(compile(setup["source"], "grader.py", "exec"), namespace)
        grade = namespace["grade"]
    except BaseException as exc:  # the grader's module failed to load: every sample gets this error
        send({"error": f"loading the grader failed: {_last_line(exc)}"})
        return
    send({"ready": True})
    for line in reader:
        request = json.loads(line)
        try:
            answer = _score(grade(request["sample"], request["item"]))
        except BaseException as exc:  # SystemExit and KeyboardInterrupt from grader code too
            answer = {"error": _last_line(exc)}
        send(answer)


if __name__ == "__main__":
    main()
