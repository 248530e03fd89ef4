"""The package boundary: runtime apart from tooling, ``py.typed``, one version. No broker."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import rabbitkeys
from rabbitkeys._observe.metrics import WorkerMetrics
from rabbitkeys._version import __version__

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rabbitkeys"
TOOLS = "rabbitkeys.tools"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """Each module ``path`` imports, absolute, and whether the import runs on import of the
    module (top level, or under a top-level ``if``/``try``) rather than inside a function."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, at_import_time: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, at_import_time) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from . import x` may import the submodule x
                found.extend((f"{base}.{alias.name}", at_import_time) for alias in child.names)
                found.append((base, at_import_time))
            inside = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, at_import_time and not inside)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def _runtime_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts)


def test_the_runtime_imports_nothing_from_the_tooling() -> None:
    runtime = _runtime_modules()
    assert PACKAGE / "_worker" / "worker.py" in runtime and PACKAGE / "cli" / "entry.py" in runtime
    offending = []
    for path in runtime:
        for name, at_import_time in _imports(path):
            if name != TOOLS and not name.startswith(f"{TOOLS}."):
                continue
            # The CLI is the one bridge: `rabbitkeys demo|chaos|bench` import the tooling
            # inside their command functions, so `rabbitkeys worker` never loads it.
            if path.parent == PACKAGE / "cli" and not at_import_time:
                continue
            offending.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offending == []


def test_the_import_walk_sees_relative_imports_of_the_tooling() -> None:
    # the walk above must not pass for want of resolving `..tools` or `.tools.x`
    cli = {name for path in (PACKAGE / "cli").glob("*.py") for name, _ in _imports(path)}
    assert {"rabbitkeys.tools.demo", "rabbitkeys.tools.chaos", "rabbitkeys.tools.bench"} <= cli
    runner = {name for name, _ in _imports(PACKAGE / "tools" / "bench" / "runner.py")}
    assert {"rabbitkeys.tools.cluster", "rabbitkeys._publisher.publisher"} <= runner


def test_importing_every_runtime_module_loads_no_tooling() -> None:
    modules = [_module_name(p) for p in _runtime_modules() if p.name != "__main__.py"]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({TOOLS!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_demo_app_has_a_public_home() -> None:
    from rabbitkeys._worker.app import App, load_app

    app = load_app("rabbitkeys.tools.demo:app")
    assert isinstance(app, App) and app.job_types


def test_deploy_runs_the_public_demo_app_not_a_private_module() -> None:
    texts = [p.read_text() for p in (ROOT / "deploy").rglob("*") if p.is_file()]
    assert any("rabbitkeys.tools.demo:app" in text for text in texts)
    assert not any("rabbitkeys._demo" in text for text in texts)


def test_py_typed_ships_with_the_package() -> None:
    assert (PACKAGE / "py.typed").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["rabbitkeys"]


def test_the_version_has_one_source() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "rabbitkeys._version.__version__"
    assert rabbitkeys.__version__ is __version__
    assert __version__.count(".") == 2


def test_the_metrics_carry_the_version() -> None:
    registry = CollectorRegistry()
    # building a worker connects to nothing
    offline = rabbitkeys.Settings(amqp_url="amqp://guest:guest@127.0.0.1:1/", namespace="off")
    WorkerMetrics(rabbitkeys.Worker(rabbitkeys.App(), offline), registry)
    labels = {"role": "worker", "version": rabbitkeys.__version__}
    assert registry.get_sample_value("rabbitkeys_info", labels) == 1


# The public surface, pinned: moving modules between private packages must not change it
# (httpx's tests/test_exported_members.py). A deliberate change of the API edits these lists.
PUBLIC = {
    "rabbitkeys": [
        "App",
        "BrokerUnavailableError",
        "ConfigError",
        "Context",
        "DEFAULT_JOB_TYPE",
        "FailJob",
        "Handler",
        "HandlerNotFoundError",
        "InvalidKeyError",
        "InvalidMessageError",
        "JobTimeoutError",
        "MAX_KEY_BYTES",
        "Message",
        "PayloadError",
        "ProtocolError",
        "PublishError",
        "PublishOutcomeUnknownError",
        "Publisher",
        "QuotaExceededError",
        "RabbitkeysError",
        "Registry",
        "RegistryUnavailableError",
        "RetryJob",
        "Settings",
        "StartupError",
        "SyncPublisher",
        "Worker",
        "__version__",
        "close_default_publisher",
        "default_publisher",
        "load_settings",
        "publish",
    ],
    "rabbitkeys.testing": [
        "InMemoryWorker",
        "JobRecord",
        "JobState",
        "JobsFailedError",
        "run_jobs",
    ],
    "rabbitkeys.celery": [
        "JOB_TYPE",
        "Ordered",
        "OrderedTask",
        "RetryWindowExceededError",
        "WorkerTimeLimitExceeded",
        "ordered",
        "worker_app",
    ],
    "rabbitkeys.cli": [
        "EXIT_ERROR",
        "EXIT_OK",
        "EXIT_USAGE",
        "hold_request",
        "keys_request",
        "main",
        "redrive_request",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_the_public_modules_export_exactly_their_names(module: str) -> None:
    imported = importlib.import_module(module)
    assert imported.__all__ == PUBLIC[module]  # complete, and sorted
    assert all(getattr(imported, name) is not None for name in imported.__all__)


def test_the_console_script_is_the_clis_main() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rabbitkeys": "rabbitkeys.cli:main"}
    from rabbitkeys.cli import main

    assert callable(main)
