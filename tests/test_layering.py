"""The layers, checked on the source (every import counts, those inside functions too; imports under
``if TYPE_CHECKING:`` never run and do not count):

- the foundations (advisor.problems, units, safefile, policy, spec, job, software) import only each
  other: every layer stands on them;
- the headless core (advisor.*, less the front ends advisor.cli and advisor.tui and the composition
  root advisor.launcher) imports no front end, no runner and no textual;
- the CLI and the TUI never import each other (advisor.launcher composes them), and reach the runner
  only through runner.api, by name (no importlib);
- the runner reaches the core only through advisor.service (the numbers), the foundations and
  advisor.planfile (the plan), advisor.stack (the real stack it trains with); it imports no front end,
  except runner.__main__, the `python -m runner` shim that hands its arguments to the CLI's `run`;
- there is no import cycle among the project's modules (importing a module imports its packages too).
"""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("advisor", "runner")
FRONT_ENDS = ("advisor.cli", "advisor.tui")
ROOTS = ("advisor.launcher",)
FOUNDATIONS = ("advisor.problems", "advisor.units", "advisor.safefile", "advisor.policy", "advisor.spec",
               "advisor.job", "advisor.software")
# what the runner may import from the advisor (everything else of the core goes through advisor.service)
RUNNER_MAY = (*FOUNDATIONS, "advisor", "advisor.service", "advisor.planfile", "advisor.stack")
RUNNER_SHIMS = {"runner.__main__": ("advisor.cli", "advisor.cli.main")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in PACKAGES for p in sorted((ROOT / top).rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module this one imports (external ones by their top-level name), at any depth of the file."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in modules:
                out.add(t)
            elif t.split(".")[0] not in PACKAGES:
                out.add(t.split(".")[0])
    # importing a.b.c runs a and a.b first
    for m in list(out):
        parts = m.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _under(m: str, prefixes: tuple[str, ...]) -> bool:
    return any(m == p or m.startswith(p + ".") for p in prefixes)


def test_the_core_imports_no_front_end_no_runner_no_textual():
    bad = {}
    for name, deps in _graph().items():
        if name.startswith("advisor") and not _under(name, FRONT_ENDS + ROOTS):
            wrong = sorted(d for d in deps if _under(d, FRONT_ENDS + ROOTS + ("runner", "textual")))
            if wrong:
                bad[name] = wrong
    assert not bad, f"the headless core imports front ends / the runner / textual: {bad}"


def test_the_cli_and_the_tui_do_not_import_each_other():
    g = _graph()
    bad = {n: sorted(d for d in deps if _under(d, ("advisor.tui",))) for n, deps in g.items()
           if _under(n, ("advisor.cli",))}
    bad.update({n: sorted(d for d in deps if _under(d, ("advisor.cli",))) for n, deps in g.items()
                if _under(n, ("advisor.tui",))})
    assert not {k: v for k, v in bad.items() if v}


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # a package's __init__ importing its own submodules is how packages work, not a cycle of meaning
    g = {n: {d for d in deps if not (n and d.startswith(n + "."))} for n, deps in _graph().items()}
    assert not _cycles(g), _cycles(g)


def test_the_check_sees_imports_inside_functions():
    """The check itself: a function-level import is an edge (advisor.service imports advisor.memory inside
    estimate())."""
    assert "advisor.memory" in _graph()["advisor.service"]


def test_foundations_stand_on_nothing_but_each_other():
    g = _graph()
    bad = {n: sorted(d for d in g[n] if d.startswith("advisor") and d not in (*FOUNDATIONS, "advisor"))
           for n in FOUNDATIONS}
    assert not {k: v for k, v in bad.items() if v}, f"a foundation imports the layers above it: {bad}"


def test_the_runner_reaches_the_core_through_the_service():
    bad = {}
    for name, deps in _graph().items():
        if not _under(name, ("runner",)):
            continue
        allowed = RUNNER_SHIMS.get(name, ())
        wrong = sorted(d for d in deps if d.startswith("advisor") and d not in RUNNER_MAY and d not in allowed)
        if wrong:
            bad[name] = wrong
    assert not bad, f"the runner imports the core's insides or a front end: {bad}"


def test_the_front_ends_reach_the_runner_through_its_api():
    bad = {}
    for name, deps in _graph().items():
        if _under(name, FRONT_ENDS):
            wrong = sorted(d for d in deps if _under(d, ("runner",)) and d not in ("runner", "runner.api"))
            if wrong:
                bad[name] = wrong
    assert not bad, f"a front end imports runner modules other than runner.api: {bad}"
    importlib_users = sorted(n for n, deps in _graph().items() if _under(n, FRONT_ENDS) and "importlib" in deps)
    assert not importlib_users, f"front ends import modules by name at run time (invisible here): {importlib_users}"
