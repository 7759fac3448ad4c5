"""The package layout shows the pipeline, and the code keeps to it.

Stages are declared once, here, lowest first: a module may import the foundation, its own stage
and the stages below it, never one above. The order is the one the code needs, not the reading
order of the pipeline: training writes the metric stream and reads datasets, so `monitor` and
`data` sit at the bottom; `plan` predicts what training will do (its batch layout, its LoRA
targets, its model), so it sits above `train`. `graders` (OpenAI's RFT graders: a reward for a
sample) sits lowest of all: the training loop, the CLI and the server call it, and it needs none of them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tunejob"
FOUNDATION = {"errors", "spec", "catalog"}  # importable by every stage; import only each other
STAGES = ["graders", "monitor", "data", "engine", "train", "plan", "evaluate", "export", "backends", "server", "migrate"]
TOP = {"__init__", "__main__", "cli", "cli_data", "cli_migrate", "cli_grade", "runner", "demo"}  # orchestration: may import anything, imported by nothing


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every tunejob module this file imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tunejob")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunejob") and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                # `from tunejob.train import checkpoint` imports a module; `from tunejob.spec import JobSpec` a name.
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / candidate.replace(".", "/")).is_dir()
                found.add(candidate if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def stage_of(module: str) -> str:
    """'tunejob.train.trainer' -> 'train'; 'tunejob.spec' -> 'spec'; 'tunejob' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank(stage: str) -> int:
    if stage in FOUNDATION:
        return -1
    if stage in TOP:
        return len(STAGES)
    return STAGES.index(stage)


def test_every_module_belongs_to_a_declared_stage():
    unknown = {m for m in graph() if stage_of(m) not in FOUNDATION | TOP | set(STAGES)}
    assert not unknown, f"place these in a stage (and declare it in STAGES): {sorted(unknown)}"


def test_imports_follow_the_stage_order():
    wrong = []
    for module, targets in graph().items():
        src = stage_of(module)
        for target in targets:
            dst = stage_of(target)
            if src in FOUNDATION and dst not in FOUNDATION:
                wrong.append(f"{module} -> {target} (the foundation imports only errors/spec/catalog)")
            elif dst in TOP and src not in TOP:
                wrong.append(f"{module} -> {target} (nothing below the CLI imports the orchestration modules)")
            elif rank(dst) > rank(src):
                wrong.append(f"{module} -> {target} ({src} sits below {dst})")
    assert not wrong, "imports against the stage order:\n" + "\n".join(sorted(wrong))


# The server's rooms, lowest first (server/__init__.py): job execution knows nothing of HTTP; the
# chat engine's serve side nothing of routes; the API puts jobs and chat behind OpenAI's routes;
# the dashboard reads runs and calls the API's code in-process. config and errors are the
# server's foundation; app (the factory) and run (the start) put the rooms together.
SERVER_FOUNDATION = {"__init__", "config", "errors"}
SERVER_ROOMS = ["jobs", "inference", "api", "dashboard"]
SERVER_TOP = {"app", "run"}


def room_of(module: str) -> str:
    """'tunejob.server.api.chat' -> 'api'; 'tunejob.server.config' -> 'config'; 'tunejob.server' -> '__init__'."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "__init__"


def room_rank(room: str) -> int:
    if room in SERVER_FOUNDATION:
        return -1
    if room in SERVER_TOP:
        return len(SERVER_ROOMS)
    return SERVER_ROOMS.index(room)


def test_every_server_module_belongs_to_a_declared_room():
    unknown = {m for m in graph() if stage_of(m) == "server" and room_of(m) not in SERVER_FOUNDATION | SERVER_TOP | set(SERVER_ROOMS)}
    assert not unknown, f"place these in a room of the server (and declare it in SERVER_ROOMS): {sorted(unknown)}"


def test_server_rooms_import_only_rooms_below():
    wrong = []
    for module, targets in graph().items():
        if stage_of(module) != "server":
            continue
        src = room_of(module)
        for target in (t for t in targets if stage_of(t) == "server"):
            dst = room_of(target)
            if src in SERVER_FOUNDATION and dst not in SERVER_FOUNDATION:
                wrong.append(f"{module} -> {target} (the server's foundation imports only config and errors)")
            elif dst in SERVER_TOP and src not in SERVER_TOP:
                wrong.append(f"{module} -> {target} (only run.py imports the app)")
            elif room_rank(dst) > room_rank(src):
                wrong.append(f"{module} -> {target} ({src} sits below {dst})")
    assert not wrong, "server imports against the rooms' order:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if nxt == node or nxt not in g:
                continue
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(g):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_catches_what_it_should(tmp_path):
    # The two rules above must be able to fail: a stage edge upward, and a cycle.
    assert rank("plan") > rank("train") > rank("data") > rank("monitor") > rank("spec")
    assert room_rank(room_of("tunejob.server.dashboard.views")) > room_rank(room_of("tunejob.server.api.chat")) \
        > room_rank(room_of("tunejob.server.inference.generation")) > room_rank(room_of("tunejob.server.jobs.worker")) \
        > room_rank(room_of("tunejob.server.errors"))
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from tunejob.train.trainer import train\n    import tunejob.server.app\n")
    assert imports_of(f) == {"tunejob.train.trainer", "tunejob.server.app"}


def test_the_cli_starts_without_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, tunejob.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_help_imports_neither_torch_nor_transformers():
    # `tunejob --help` runs main() (quiet(), typer); importing transformers there once cost 1 s
    code = ("import sys\nfrom tunejob.cli import main\nsys.argv = ['tunejob', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stderr.split() == ["False", "False"], out.stderr
