"""train.threads: the torch-thread budget of a training child and in-process chat (pure functions)."""

from __future__ import annotations

import os

from tunejob.train import threads


def test_the_budget_never_gives_more_threads_than_cores():
    # 2 cores, a job training: the child and chat get 1 each; chat alone gets both.
    assert threads.budget(cores=2) == threads.Budget(cores=2, train=1, chat=1, chat_alone=2)
    assert threads.budget(cores=16) == threads.Budget(cores=16, train=12, chat=4, chat_alone=16)
    assert threads.budget(cores=1).train == threads.budget(cores=1).chat == 1  # one core cannot be split
    assert threads.budget(train=3, chat=2, cores=8) == threads.Budget(cores=8, train=3, chat=2, chat_alone=2)
    assert threads.budget(chat=3, cores=8).train == 5


def test_cores_follow_the_affinity_mask_and_a_child_gets_its_share(monkeypatch):
    assert 1 <= threads.available_cores() <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("TUNEJOB_THREADS", "3")
    assert threads.training_threads() == 3
    monkeypatch.delenv("TUNEJOB_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.training_threads() == 2
    assert threads.child_env(1) == {"TUNEJOB_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_only_the_training_process_itself_counts_as_a_run():
    """`/usr/bin/time -v tunejob run` and `timeout 600 tunejob run` are wrappers: only the Python
    process under them trains (issue 36's false "another tunejob training run" warning)."""
    from tunejob.train.threads import _is_training

    argv = lambda line: [w.encode() for w in line.split()]
    for training in ("/v/bin/python3 /v/bin/tunejob run job.yaml", "python -m tunejob run job.yaml",
                     "/usr/bin/python3.11 -u -m tunejob --verbose run job.yaml", "python3 -X dev -W ignore -m tunejob run j.yaml"):
        assert _is_training(argv(training)), training
    for other in ("/usr/bin/time -v tunejob run job.yaml", "timeout 600 /v/bin/tunejob run job.yaml", "tunejob run job.yaml",
                  "/v/bin/python3 /v/bin/accelerate launch --multi_gpu /v/bin/tunejob run job.yaml",
                  "python -m tunejob serve --port 8000", "/bin/sh -c exec python -m tunejob run x"):
        assert not _is_training(argv(other)), other


def test_the_server_yields_to_training_and_its_children_do_not():
    """Issue 31, finding 12: at equal priority the server's threads (HTTP, chat) took half of a
    training child's core under 32 clients. Threads the server starts after yield_to_training()
    run at SERVER_NICE; the thread started before it (the worker, which spawns training) does not,
    and neither do the children it spawns."""
    import os
    import subprocess
    import sys
    import threading

    from tunejob.train.threads import SERVER_NICE, yield_to_training

    seen: dict[str, int] = {}
    go = threading.Event()

    def spawner():  # the job worker's thread: started before the server yields
        go.wait()
        seen["spawner"] = os.getpriority(os.PRIO_PROCESS, 0)
        out = subprocess.run([sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"], capture_output=True, text=True)
        seen["child"] = int(out.stdout)

    def server():  # the event loop's thread
        t = threading.Thread(target=spawner)
        t.start()
        before = os.getpriority(os.PRIO_PROCESS, 0)
        yield_to_training()
        seen["before"], seen["server"] = before, os.getpriority(os.PRIO_PROCESS, 0)
        later = threading.Thread(target=lambda: seen.__setitem__("chat", os.getpriority(os.PRIO_PROCESS, 0)))
        later.start()
        later.join()
        go.set()
        t.join()

    s = threading.Thread(target=server)
    s.start()
    s.join()
    assert seen["server"] == seen["chat"] == max(seen["before"], SERVER_NICE)
    assert seen["spawner"] == seen["child"] == seen["before"]
