"""The house rules of docs/architecture.md, read from the source: layered packages (utils < data < models <
training < tools, benchmarks), no import cycle, the run config read through its typed sections, and DeepSpeed's
private names touched in `training/ds/` only."""
from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYER = {"utils": 0, "data": 1, "models": 2, "training": 3, "tools": 4, "benchmarks": 4}


def _sources(packages=LAYER) -> dict[str, pathlib.Path]:
    """Module name -> file of every project module (benchmarks' run output excluded)."""
    out = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if {"work", "results"} & set(rel.parts):
                continue
            name = ".".join(rel.with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imported(name: str, path: pathlib.Path) -> set[str]:
    """Dotted names `path` imports, anywhere in the file (function-level imports count), relative ones resolved."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]) if node.level \
                else node.module or ""
            found.add(base.rstrip("."))
            found.update(f"{base.rstrip('.')}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (a package's own submodules left out)."""
    modules = _sources()

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph = {}
    for name, path in modules.items():
        deps = {owner(d) for d in _imported(name, path)} - {None, name}
        graph[name] = {d for d in deps if not d.startswith(name + ".")}
    return graph


def test_no_import_runs_up_the_layers():
    upward = [f"{mod} imports {dep}" for mod, deps in _graph().items() for dep in deps
              if LAYER[dep.split(".")[0]] > LAYER[mod.split(".")[0]]]
    assert not upward, upward


def test_utils_is_a_leaf():
    outside = [f"{mod} imports {dep}" for mod, deps in _graph().items() if mod.startswith("utils")
               for dep in deps if not dep.startswith("utils")]
    assert not outside, outside


def test_no_import_cycle():
    graph, index, low, stack, on_stack, cycles = _graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_training_reads_the_config_through_its_sections():
    """String-literal subscripts in training/ are metric rows and JSON only (the run config is typed)."""
    literal = re.compile(r"(?<=[\w)\]])\[(f?\"[^\"\n]*\"|f?'[^'\n]*')\]")
    subscripts = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in sorted((ROOT / "training").rglob("*.py"))
                  for m in literal.finditer(path.read_text(encoding="utf-8"))]
    assert len(subscripts) <= 25, subscripts
    config_reads = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in sorted((ROOT / "training").rglob("*.py"))
                    for m in re.finditer(r"\bcfg(\.ours)?\[[^]]*\]", path.read_text(encoding="utf-8"))]
    assert not config_reads, config_reads


def test_both_trainers_implement_the_declared_strategy():
    """`training.strategy.Trainer` is what the loop calls: both trainers have every method, with its parameters."""
    import inspect

    from training.pipeline import PipelineTrainer
    from training.strategy import Trainer
    from training.zero import ZeroTrainer

    methods = [n for n, v in vars(Trainer).items() if callable(v) and not n.startswith("_")]
    assert {"check", "dims", "prepare_model", "build", "step", "save_extras"} <= set(methods)
    for cls in (PipelineTrainer, ZeroTrainer):
        assert isinstance(cls(), Trainer), cls
        for name in methods:
            assert list(inspect.signature(getattr(cls, name)).parameters) == \
                list(inspect.signature(getattr(Trainer, name)).parameters), (cls, name)
