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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Layers:
    """An import order: `order` lowest first, a `foundation` every layer may import (which imports
    only itself), a `top` that may import anything and that nothing below imports. A module's
    layer is the `depth`-th part of its dotted name ('__init__' where it has none)."""

    foundation: frozenset[str]
    order: tuple[str, ...]
    top: frozenset[str]
    depth: int

    def of(self, module: str) -> str:
        parts = module.split(".")
        return parts[self.depth] if len(parts) > self.depth else "__init__"

    def rank(self, layer: str) -> int:
        if layer in self.foundation:
            return -1
        if layer in self.top:
            return len(self.order)
        return self.order.index(layer)

    def declared(self) -> set[str]:
        return set(self.foundation | self.top) | set(self.order)

    def violations(self, edges: dict[str, set[str]], foundation_note: str, top_note: str) -> list[str]:
        wrong = []
        for module, targets in edges.items():
            src = self.of(module)
            for target in targets:
                dst = self.of(target)
                if src in self.foundation and dst not in self.foundation:
                    wrong.append(f"{module} -> {target} ({foundation_note})")
                elif dst in self.top and src not in self.top:
                    wrong.append(f"{module} -> {target} ({top_note})")
                elif self.rank(dst) > self.rank(src):
                    wrong.append(f"{module} -> {target} ({src} sits below {dst})")
        return sorted(wrong)


STAGE_LAYERS = Layers(frozenset(FOUNDATION), tuple(STAGES), frozenset(TOP), depth=1)
stage_of, rank = STAGE_LAYERS.of, STAGE_LAYERS.rank  # 'tunejob.train.trainer' -> 'train'; 'tunejob' -> '__init__'


def test_every_module_belongs_to_a_declared_stage():
    unknown = {m for m in graph() if stage_of(m) not in STAGE_LAYERS.declared()}
    assert not unknown, f"place these in a stage (and declare it in STAGES): {sorted(unknown)}"


def test_imports_follow_the_stage_order():
    wrong = STAGE_LAYERS.violations(graph(), "the foundation imports only errors/spec/catalog",
                                    "nothing below the CLI imports the orchestration modules")
    assert not wrong, "imports against the stage order:\n" + "\n".join(wrong)


# The server's rooms, lowest first (server/__init__.py): job execution knows nothing of HTTP; the
# chat engine's serve side nothing of routes; the API puts jobs and chat behind OpenAI's routes;
# the dashboard reads runs and calls the API's code in-process. config and errors are the
# server's foundation; app (the factory) and run (the start) put the rooms together.
SERVER_LAYERS = Layers(frozenset({"__init__", "config", "errors"}), ("jobs", "inference", "api", "dashboard"),
                       frozenset({"app", "run"}), depth=2)
room_of, room_rank = SERVER_LAYERS.of, SERVER_LAYERS.rank  # 'tunejob.server.api.chat' -> 'api'


def server_graph() -> dict[str, set[str]]:
    """The server's modules and the server modules each imports."""
    return {m: {t for t in targets if stage_of(t) == "server"} for m, targets in graph().items() if stage_of(m) == "server"}


def test_every_server_module_belongs_to_a_declared_room():
    unknown = {m for m in server_graph() if room_of(m) not in SERVER_LAYERS.declared()}
    assert not unknown, f"place these in a room of the server (and declare it in SERVER_LAYERS): {sorted(unknown)}"


def test_server_rooms_import_only_rooms_below():
    wrong = SERVER_LAYERS.violations(server_graph(), "the server's foundation imports only config and errors",
                                     "only run.py imports the app")
    assert not wrong, "server imports against the rooms' order:\n" + "\n".join(wrong)


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
