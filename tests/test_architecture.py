"""Architecture checks, static (``ast``, nothing checked is imported except ``medvlm_core.settings`` at the end).

- the core (``medvlm_core``) never imports the orchestration (``prefect``, ``flows``, ``tasks``), and the
  runtime core never imports its development tools (``medvlm_core.testing``);
- the core's modules import each other without a cycle (lazy, function-level imports included);
- only ``medvlm_core/settings.py`` reads the environment (plus ``flows/in_process.py``, which sets Prefect defaults,
  ``flows/demo.py``, which hands the demo's S3 server to the run,
  and ``medvlm_core/testing/``, whose tools start subprocesses with an environment);
- at least 95% of the public modules, functions, classes and methods have a docstring;
- the docs' settings table (docs/settings.md) lists exactly the variables ``Settings`` reads;
- no module is over 500 lines, the core's top level is small, each output table is defined once;
- every package folder is installed (pyproject.toml), the flows and tasks as ``medvlm.flows``, ``medvlm.tasks``.

Each failure lists the offending files (``path:line``) or names.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = "medvlm_core"
ORCHESTRATION = ("prefect", "airflow", "flows", "tasks", "medvlm")  # medvlm.flows, medvlm.tasks, medvlm.airflow
PROVIDER = "airflow_provider"  # installed as medvlm.airflow
TESTING = "medvlm_core.testing"

# Where reading or passing on the environment is allowed (paths relative to the repository root).
ENV_ALLOWED_FILES = {"medvlm_core/settings.py", "flows/in_process.py", "flows/demo.py"}
ENV_ALLOWED_DIRS = ("medvlm_core/testing/",)
ENV_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}

DOCSTRING_COVERAGE = 0.95


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here uses Prefect."""
    yield


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _files(*packages: str) -> list[Path]:
    """The ``.py`` files under the given top-level folders, sorted, without caches."""
    found = []
    for package in packages:
        found += [p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(found)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        pytest.fail(f"{_rel(path)}:{exc.lineno}: cannot be parsed: {exc.msg}")


def _module_name(path: Path) -> str:
    """``medvlm_core/engine/__init__.py`` -> ``medvlm_core.engine``; ``medvlm_core/x.py`` -> ``medvlm_core.x``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name of ``from <node.module> import ...`` written in ``module``."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    return ".".join(base + ([node.module] if node.module else []))


def _imported_names(tree: ast.Module, module: str, is_package: bool):
    """Every import in the file, at any depth (lazy ones inside functions too), ``__future__`` excluded.

    Yields ``(line, candidates, statement)``: for ``import a.b.c`` the candidates are ``["a.b.c"]``; for
    ``from a.b import c, d`` one triple per name, ``["a.b.c", "a.b"]`` (most specific first: ``c`` may be a
    submodule or an attribute of ``a.b``); relative imports are resolved. ``importlib.import_module("x")`` /
    ``__import__("x")`` with a constant name count too. ``statement`` is the import as written.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, [alias.name], f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__" and not node.level:
                continue
            base = _resolve_from(node, module, is_package)
            written = "." * node.level + (node.module or "")
            for alias in node.names:
                statement = f"from {written} import {alias.name}"
                if alias.name == "*":
                    yield node.lineno, [base], statement
                else:
                    yield node.lineno, [f"{base}.{alias.name}" if base else alias.name, base], statement
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, [node.args[0].value], f"{name}({node.args[0].value!r})"


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# ---------------------------------------------------------------------------------------------------------
# 1. The core does not depend on the orchestration, nor the runtime core on the development tools


def test_core_imports_no_orchestration():
    offenders = []
    for path in _files(CORE):
        module = _module_name(path)
        runtime = not _within(module, TESTING)
        for line, candidates, statement in _imported_names(_parse(path), module, _is_package(path)):
            top = candidates[0].split(".")[0]
            if top in ORCHESTRATION or top.startswith("prefect_"):
                offenders.append(f"{_rel(path)}:{line}: {statement} (orchestration)")
            elif runtime and any(_within(c, TESTING) for c in candidates if c):
                offenders.append(f"{_rel(path)}:{line}: {statement} (development tools, not the runtime)")
    assert not offenders, (
        "medvlm_core must not import prefect, airflow, flows, tasks or the provider, and its runtime must not import "
        "medvlm_core.testing:\n  " + "\n  ".join(offenders)
    )


def test_the_two_orchestrators_never_import_each_other():
    """The Prefect layer (flows, tasks) and the Airflow provider live in environments that cannot hold both: each
    imports only the core (and its own orchestrator)."""
    offenders = []
    for path in _files("flows", "tasks"):
        for line, candidates, statement in _imported_names(_parse(path), "x", False):
            if candidates[0].split(".")[0] == "airflow" or _within(candidates[0], "medvlm.airflow"):
                offenders.append(f"{_rel(path)}:{line}: {statement}")
    for path in _files(PROVIDER):
        for line, candidates, statement in _imported_names(_parse(path), "x", False):
            top = candidates[0].split(".")[0]
            if top == "prefect" or top.startswith("prefect_") or _within(candidates[0], "medvlm.flows") \
                    or _within(candidates[0], "medvlm.tasks"):
                offenders.append(f"{_rel(path)}:{line}: {statement}")
    assert not offenders, "flows/tasks must not import Airflow, nor the provider Prefect:\n  " + "\n  ".join(offenders)


# ---------------------------------------------------------------------------------------------------------
# 2. No import cycle inside the core


def _core_import_graph() -> dict[str, dict[str, list[str]]]:
    """module -> {imported module -> ["path:line", ...]}, over medvlm_core's modules only."""
    paths = _files(CORE)
    modules = {_module_name(p) for p in paths}

    def target(candidates: list[str]) -> str | None:
        for candidate in candidates:
            parts = candidate.split(".")
            for n in range(len(parts), 0, -1):  # the most specific name that is a module of the package
                name = ".".join(parts[:n])
                if name in modules:
                    return name
        return None

    graph: dict[str, dict[str, list[str]]] = {m: defaultdict(list) for m in sorted(modules)}
    for path in paths:
        module = _module_name(path)
        for line, candidates, _ in _imported_names(_parse(path), module, _is_package(path)):
            candidates = [c for c in candidates if _within(c, CORE)]
            to = target(candidates) if candidates else None
            # ``from medvlm_core.x import y`` where y is a name: first candidate "medvlm_core.x.y" is not a
            # module, so target() falls back to its longest module prefix, "medvlm_core.x".
            where = f"{_rel(path)}:{line}"
            if to is not None and to != module and where not in graph[module][to]:
                graph[module][to].append(where)
    return graph


def _strongly_connected(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def _elementary_cycles(graph, component: list[str], limit: int = 50) -> list[list[str]]:
    """The simple cycles within one component, each starting at its smallest module (at most ``limit``)."""
    members = set(component)
    cycles: list[list[str]] = []
    for start in component:
        allowed = {m for m in members if m >= start}
        path = [start]

        def walk(node: str) -> None:
            for child in sorted(graph[node]):
                if len(cycles) >= limit or child not in allowed:
                    continue
                if child == start:
                    cycles.append(path + [start])
                elif child not in path:
                    path.append(child)
                    walk(child)
                    path.pop()

        walk(start)
    return cycles


def test_core_has_no_import_cycle():
    graph = _core_import_graph()
    report = []
    for component in _strongly_connected(graph):
        cycles = _elementary_cycles(graph, component)
        if len(cycles) >= 50:
            report.append(f"(the first 50 cycles among {', '.join(component)})")
        for cycle in cycles:
            where = "; ".join(
                f"{a} -> {b} at {', '.join(graph[a][b])}" for a, b in zip(cycle, cycle[1:])
            )
            report.append(f"{' -> '.join(cycle)}\n      ({where})")
    assert not report, "import cycles among medvlm_core's modules (lazy imports count):\n  " + "\n  ".join(report)


# ---------------------------------------------------------------------------------------------------------
# 3. Only the settings module reads the environment


def _environment_uses(path: Path) -> list[tuple[int, str]]:
    tree = _parse(path)
    os_names = set()  # names bound to the os module
    env_names = {}  # local name -> os attribute, from ``from os import environ [as e]``
    uses: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "os":
                    os_names.add(alias.asname or "os")
                elif alias.name.startswith("os.") and not alias.asname:
                    os_names.add("os")
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and not node.level:
            for alias in node.names:
                if alias.name in ENV_NAMES or alias.name == "*":
                    env_names[alias.asname or alias.name] = alias.name
                    uses.append((node.lineno, f"from os import {alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in os_names and node.attr in ENV_NAMES:
                uses.append((node.lineno, f"os.{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in env_names and isinstance(node.ctx, ast.Load):
            uses.append((node.lineno, env_names[node.id]))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in os_names
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in ENV_NAMES
        ):
            uses.append((node.lineno, f"getattr(os, {node.args[1].value!r})"))
    return sorted(set(uses))


def test_environment_is_read_only_by_settings():
    offenders = []
    for path in _files(CORE, "tasks", "flows", PROVIDER):
        rel = _rel(path)
        if rel in ENV_ALLOWED_FILES or rel.startswith(ENV_ALLOWED_DIRS):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for line, what in _environment_uses(path):
            offenders.append(f"{rel}:{line}: {what}: {lines[line - 1].strip()}")
    assert not offenders, (
        "only medvlm_core/settings.py (Settings) reads the environment; pass a Settings object down instead "
        "(allowed also: flows/in_process.py and flows/demo.py, which set Prefect defaults and the demo S3 server's "
        "variables, and medvlm_core/testing/):\n  " + "\n  ".join(offenders)
    )


# ---------------------------------------------------------------------------------------------------------
# 4. Docstrings on the public API


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _decorator_names(node) -> list[str]:
    names = []
    for d in node.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        names.append(ast.unparse(d))
    return names


def _top_level(body):
    """Statements at module level, looking into top-level ``if``/``try`` blocks (version or import guards)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _top_level(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
        else:
            yield node


def _docstring_targets(path: Path):
    """``(qualname, documented)`` for the module, its public functions and classes, and their public methods."""
    tree = _parse(path)
    yield "<module>", ast.get_docstring(tree) is not None
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in _top_level(tree.body):
        if not isinstance(node, functions + (ast.ClassDef,)) or not _is_public(node.name):
            continue
        if isinstance(node, functions) and any(d.endswith("overload") for d in _decorator_names(node)):
            continue
        yield node.name, ast.get_docstring(node) is not None
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if not isinstance(item, functions) or not _is_public(item.name):
                    continue  # private and dunder methods are not counted
                decorators = _decorator_names(item)
                if any(d.endswith(("overload", ".setter", ".deleter")) for d in decorators):
                    continue  # a property's setter shares the property's docstring
                yield f"{node.name}.{item.name}", ast.get_docstring(item) is not None


def test_public_names_have_docstrings():
    total = 0
    undocumented = []
    for path in _files(CORE, "tasks", "flows", PROVIDER):
        for qualname, documented in _docstring_targets(path):
            total += 1
            if not documented:
                undocumented.append(f"{_rel(path)}:{qualname}")
    coverage = (total - len(undocumented)) / total
    print(
        f"docstring coverage of medvlm_core/, tasks/, flows/: {coverage:.1%} "
        f"({total - len(undocumented)} of {total} modules, public functions, classes and methods)"
    )
    for name in undocumented:
        print(f"  undocumented: {name}")
    assert coverage >= DOCSTRING_COVERAGE, (
        f"docstring coverage {coverage:.1%} is under {DOCSTRING_COVERAGE:.0%}; undocumented:\n  "
        + "\n  ".join(undocumented)
    )


# ---------------------------------------------------------------------------------------------------------
# 5. The docs' settings page documents exactly the settings

SETTINGS_PAGE = "docs/settings.md"


def _documented_settings_rows() -> list[str]:
    """The backticked variable names in the first cell of the rows of the settings page's table."""
    text = (ROOT / SETTINGS_PAGE).read_text(encoding="utf-8")
    section = re.search(r"^## Settings \(environment\)[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, f'{SETTINGS_PAGE} has no "## Settings (environment)" section'
    names = []
    for line in section.group(1).splitlines():
        if not line.lstrip().startswith("|"):
            continue
        first = line.strip().strip("|").split("|")[0].strip()
        match = re.fullmatch(r"`([A-Za-z_][A-Za-z0-9_]*)`", first)
        if match:
            names.append(match.group(1))
    return names


def test_settings_page_lists_exactly_the_settings():
    from medvlm_core.settings import environment_names

    expected = environment_names()
    rows = _documented_settings_rows()
    documented = set(rows)
    field_of = {variable: field for field, variable in expected.items()}
    missing = sorted(set(expected.values()) - documented)
    extra = sorted(documented - set(expected.values()))
    duplicated = sorted({name for name in rows if rows.count(name) > 1})
    problems = [f"missing from the table: {v} (Settings.{field_of[v]})" for v in missing]
    problems += [f"in the table but not a Settings field: {v}" for v in extra]
    problems += [f"listed more than once: {v}" for v in duplicated]
    assert not problems, f'{SETTINGS_PAGE} "## Settings (environment)" and medvlm_core.settings.Settings differ:\n  ' + (
        "\n  ".join(problems)
    )


# ---------------------------------------------------------------------------------------------------------
# 6. Every package folder is installed, the flows and tasks under the medvlm namespace


def test_pyproject_lists_every_package():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"medvlm.flows": "flows", "medvlm.tasks": "tasks", "medvlm.airflow": PROVIDER,
               "medvlm.airflow.example_dags": f"{PROVIDER}/example_dags"}
    expected = {_module_name(p) for p in _files(CORE) if _is_package(p)}
    expected |= set(folders)
    assert set(config["packages"]) == expected, "pyproject.toml [tool.setuptools] packages must list every package"
    assert config["package-dir"] == folders  # a user's own tasks.py or flows/ cannot shadow medvlm's


# ---------------------------------------------------------------------------------------------------------
# 7. The folder tree is the architecture: short modules, a small top level, each output table defined once

MAX_MODULE_LINES = 500
MAX_TOP_LEVEL_MODULES = 12
# Where Arrow schemas and pandera models may be written out by hand: the output tables' one definition, the
# inputs' models (the manifest, the gold file), and internal files that are not output tables (the manifest
# plan, the done index's buckets, the schema a structured extraction derives from its prompt's JSON schema).
SCHEMA_OWNERS = {
    "medvlm_core/output/tables.py", "medvlm_core/inputs/manifest_checks.py", "medvlm_core/inputs/manifest.py",
    "medvlm_core/evals/gold.py", "medvlm_core/output/done_index.py", "medvlm_core/output/structured.py",
}


def test_no_module_is_over_500_lines():
    long = [f"{_rel(p)}: {n} lines" for p in _files(CORE, "flows", "tasks", PROVIDER)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job):\n  " + "\n  ".join(long)


def test_the_core_top_level_is_small():
    modules = sorted(p.name for p in (ROOT / CORE).glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, (
        f"medvlm_core has {len(modules)} modules at its top level (at most {MAX_TOP_LEVEL_MODULES}): put each in "
        f"the subpackage of its stage: {', '.join(modules)}"
    )


def _hand_written_schemas(path: Path) -> list[tuple[int, str]]:
    """``pa.schema(...)`` / ``pyarrow.schema(...)`` calls and ``DataFrameModel`` subclasses in a file."""
    found = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "schema":
            if isinstance(node.func.value, ast.Name) and node.func.value.id in ("pa", "pyarrow"):
                found.append((node.lineno, ast.unparse(node)[:60]))
        elif isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("DataFrameModel") for b in node.bases):
            found.append((node.lineno, f"class {node.name}(DataFrameModel)"))
    return found


def test_output_tables_are_defined_once():
    offenders = [f"{_rel(p)}:{line}: {what}" for p in _files(CORE, "flows", "tasks") if _rel(p) not in SCHEMA_OWNERS
                 for line, what in _hand_written_schemas(p)]
    assert not offenders, (
        "an output table's columns are defined once, in medvlm_core/output/tables.py (Arrow schema and pandera "
        "schema are derived from it); these write one out by hand:\n  " + "\n  ".join(offenders)
    )
    from medvlm_core.output import results, tables

    for name, table in tables.RUN_TABLES.items():
        assert results.TABLES[name].equals(table.arrow_schema())
        assert list(table.pandera_schema().columns) == list(table.column_names)
