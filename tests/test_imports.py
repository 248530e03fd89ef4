"""What the package imports: its modules import one another without cycles (imports only
for type checking included), so a reader can take each module after those it uses; and
every other library it imports is declared in pyproject.toml. No broker."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import rabbitkeys

PACKAGE = Path(rabbitkeys.__file__).parent


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            # `from . import _x` imports the submodule; `from ._x import y` the module _x
            found.update(submodules or ({base} & modules))
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_of_the_package_imports_itself_back() -> None:
    files = module_files()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    assert graph["rabbitkeys._settings"] >= {"rabbitkeys._tls"}  # the reader sees imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def distribution(requirement: str) -> str:
    """The normalised distribution name of a requirement (PEP 503)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group()).lower()


def test_every_library_the_package_imports_is_declared() -> None:
    """A library that comes in only through another's dependencies can go away with a
    release of that other one (aiormq and pamqp through aio-pika, say)."""
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    required = {distribution(r) for r in project["dependencies"]}
    optional = {
        distribution(r)
        for extra in ("uvloop", "plots", "otel", "celery")  # imported only where asked for
        for r in project["optional-dependencies"][extra]
    }
    providers = importlib.metadata.packages_distributions()
    imported: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.partition(".")[0])
    libraries = imported - set(sys.stdlib_module_names) - {"rabbitkeys"}
    assert {"aio_pika", "aiormq", "pamqp", "pydantic"} <= libraries
    undeclared = {
        module: providers.get(module)
        for module in libraries
        if not {distribution(d) for d in providers.get(module, [module])} & (required | optional)
    }
    assert undeclared == {}


# The pure cores decide order and ownership; the shells around them do the I/O. A core that
# imported the AMQP client or asyncio could no longer be tested (and read) without a broker.
# Every module a package's docstring calls core is listed here (the wire is core through and
# through), and a test below holds the list to those docstrings.
PURE_CORES = [
    "rabbitkeys._admin.permissions",
    "rabbitkeys._publisher.lane",
    "rabbitkeys._publisher.room",
    "rabbitkeys._registry.assignment",
    "rabbitkeys._registry.keybook",
    "rabbitkeys._registry.keybook.book",
    "rabbitkeys._registry.keybook.broker_view",
    "rabbitkeys._registry.keybook.commands",
    "rabbitkeys._registry.keybook.declare",
    "rabbitkeys._registry.keybook.hold_bindings",
    "rabbitkeys._registry.keybook.holds",
    "rabbitkeys._registry.keybook.ledger",
    "rabbitkeys._registry.keybook.members",
    "rabbitkeys._registry.keybook.records",
    "rabbitkeys._registry.keybook.retire",
    "rabbitkeys._registry.keylist",
    "rabbitkeys._wire.batch",
    "rabbitkeys._wire.envelope",
    "rabbitkeys._wire.payload",
    "rabbitkeys._wire.protocol",
    "rabbitkeys._wire.senders",
    "rabbitkeys._wire.topology",
    "rabbitkeys._worker.app",
    "rabbitkeys._worker.dedup",
    "rabbitkeys._worker.job_run",
    "rabbitkeys._worker.retry",
]
IO_LIBRARIES = {"aio_pika", "aiormq", "pamqp", "asyncio", "socket", "urllib.request"}
# pamqp's codec (frames and field tables to bytes and back, no I/O) is the wire's to use:
# the envelope and the batch body are written in AMQP's own table format
CODEC = {"pamqp"}


def test_the_pure_cores_import_no_io_at_all_not_even_through_the_package() -> None:
    files = module_files()
    modules = set(files)
    for core in PURE_CORES:
        seen, todo = set(), [core]
        while todo:  # everything the core reaches through the package's own modules
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(imports_of(name, files[name], modules))
        for name in sorted(seen):
            tree = ast.parse(files[name].read_text())
            top = {
                alias.name.split(".")[0]
                for node in ast.walk(tree)
                if isinstance(node, ast.Import)
                for alias in node.names
            } | {
                (node.module or "").split(".")[0]
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and not node.level
            }
            banned = IO_LIBRARIES - (CODEC if name.startswith("rabbitkeys._wire.") else set())
            assert not top & banned, f"{core} reaches {name}, which imports {top & banned}"


# The roles stand side by side on the shared layers (the wire, the broker helpers,
# observability, settings): none imports another, so each can be read, and changed, alone.
ROLES = ["rabbitkeys._admin", "rabbitkeys._publisher", "rabbitkeys._registry", "rabbitkeys._worker"]
SHARED = ["rabbitkeys._broker", "rabbitkeys._observe", "rabbitkeys._wire"]


def package_of(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_no_role_imports_another_role() -> None:
    files = module_files()
    modules = set(files)
    crossing = sorted(
        f"{name} imports {other}"
        for name, path in files.items()
        if package_of(name) in ROLES
        for other in imports_of(name, path, modules)
        if package_of(other) in ROLES and package_of(other) != package_of(name)
    )
    assert crossing == []


def test_the_shared_layers_import_no_role() -> None:
    """The wire, the broker helpers and observability stand under every role."""
    files = module_files()
    modules = set(files)
    upward = sorted(
        f"{name} imports {other}"
        for name, path in files.items()
        if package_of(name) in SHARED
        for other in imports_of(name, path, modules)
        if package_of(other) in ROLES
    )
    assert upward == []


def test_every_role_and_layer_is_a_package_whose_docstring_names_core_and_shell() -> None:
    files = module_files()
    for package in ROLES + SHARED:
        assert files[package].name == "__init__.py", package
        text = files[package].read_text()
        for name, path in files.items():
            if name.startswith(f"{package}.") and path.name != "__init__.py":
                assert f"``{name.rpartition('.')[2]}``" in text, f"{package} does not name {name}"


def test_the_list_of_pure_cores_is_what_the_packages_call_core() -> None:
    """Each package's docstring has a ``Core`` paragraph (the wire: every module); the list
    above holds exactly those modules, so a new core is checked once it is called one."""
    files = module_files()
    called_core = set()
    for package in ROLES + SHARED:
        text = files[package].read_text()
        if package == "rabbitkeys._wire":
            core = text
        elif "Core (pure" in text:
            core = text.split("Core (pure", 1)[1].split("Shell:", 1)[0]
        else:
            continue
        called_core.update(
            name
            for name in files
            if name.startswith(f"{package}.") and f"``{name.rpartition('.')[2]}``" in core
        )
    assert sorted(called_core) == PURE_CORES
