"""The package's shape: module imports run one way (no cycles), and the pre-rename ``unix`` names survive only where
old checkpoints need them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling", "uni_arch", "data_process", "evaluation", "tools", "draw_pics")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports at module level or inside functions (package ``__init__``s excluded:
    they only re-export, and would make every submodule look cyclic)."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py"]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_project_modules_import_each_other_without_cycles():
    graph = _import_graph()
    assert "modeling.layers" in graph["modeling.modeling_mot"] and "modeling.layers" in graph["modeling.modeling_moe"]
    assert "modeling.modeling_uni_x" not in graph["modeling.modeling_mot"] | graph["modeling.modeling_moe"]
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"


def test_cycle_finder_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_pre_rename_unix_names_remain_only_for_old_checkpoints():
    """``unix_*`` read as the operating system; only the legacy constants, lines that document the rename and the
    reference's ``model_spec_module=unix`` spelling may still say it."""
    allowed = {"modeling/configuration_uni_x.py", "uni_arch/train/args.py"}
    offenders = []
    for pkg in PACKAGES + ("configs",):
        for path in (ROOT / pkg).rglob("*"):
            if path.suffix not in {".py", ".json", ".yaml", ".jinja", ".sh"}:
                continue
            rel = path.relative_to(ROOT).as_posix()
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"unix|UNIX", line) and "rename" not in line and rel not in allowed:
                    offenders.append(f"{rel}:{i}: {line.strip()}")
    for script in ("train.sh", "tests/run.sh", "tools/setup_env.sh"):
        text = (ROOT / script).read_text(encoding="utf-8")
        offenders += [f"{script}: {m}" for m in re.findall(r"\S*UNIX\S*|\S*unix\S*", text)]
    assert not offenders, "\n".join(offenders)
