"""The documentation site (``docs/``) and the README: it builds, its links resolve, and the
Guide's code runs.

- **Build**: ``sphinx-build -W --keep-going -n -b html`` (warnings are errors, every
  cross-reference must resolve) into a temporary directory. Without Sphinx (the ``docs``
  extra) it skips locally and fails under ``CI=true``.
- **Links**: every relative link in ``README.md`` and ``docs/**/*.md`` names a file or folder
  that exists, and its ``#anchor`` a heading (GitHub's slug of it) or an ``<a id>`` of the
  page it points at: the pages read on GitHub as they do on the site, and the README (which
  Sphinx never sees) is checked too. Links to other sites are not fetched.
- **Snippets**: every ``python`` block of ``docs/guide/*.md`` runs, against the test broker
  (a namespace of its own, ``RABBITKEYS_*`` pointed at it, a registry running), the blocks
  of a page in order in one namespace, as a reader would paste them. Top-level ``await``
  works, one statement at a time, so a page can mix async and sync code as the Guide does.
  A block that cannot run here says so on the line before its fence, with the reason, in a
  comment GitHub and the site do not show::

      <!-- not run: the whole example is examples/testing_handlers/, run by test_examples -->
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import rabbitkeys
import rabbitkeys.celery
import rabbitkeys.testing
from rabbitkeys import Registry, Settings
from rabbitkeys._settings import ENV_PREFIX
from rabbitkeys.tools.cluster import _settings_env

from .support import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: the pages: Markdown under docs/ but the build's output and the scripts' folders
PAGES = sorted(
    path
    for path in DOCS.rglob("*.md")
    if not {"_build", "probes", "bench"} & set(path.relative_to(DOCS).parts[:-1])
)
GUIDE = sorted((DOCS / "guide").glob("*.md"))
NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>.+\S) -->$")
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
#: CI's build: warnings are errors (all of them reported), every reference must resolve
SPHINX_BUILD = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html"]
HTML_ID = re.compile(r"<a id=\"([^\"]+)\"></a>")


# --------------------------------------------------------------------------- the build


def test_the_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    if importlib.util.find_spec("sphinx") is None:
        skip_or_fail("Sphinx is not installed: pip install -e '.[docs]'")
    built = subprocess.run(
        [*SPHINX_BUILD, str(DOCS), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    for page in PAGES:
        html = tmp_path / "html" / page.relative_to(DOCS).with_suffix(".html")
        assert html.is_file(), f"{page.relative_to(ROOT)} is in no toctree: {html} not built"


# --------------------------------------------------------------------------- the links


def _outside_code(text: str) -> Iterator[tuple[int, str]]:
    """The lines of a Markdown text that are not in a fenced block, with their numbers."""
    fence = ""
    for number, line in enumerate(text.split("\n"), 1):
        opened = FENCE.match(line)
        if opened and not fence:
            fence = opened.group(1)
        elif fence and line.strip() == fence[0] * len(line.strip()) and len(line.strip()) >= 3:
            fence = ""
        elif not fence:
            yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub (and MyST, ``myst_heading_anchors``) gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    """The anchors a page has: its headings' slugs (numbered when repeated, as GitHub
    does) and its ``<a id>`` elements."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _outside_code(page.read_text()):
        heading = re.match(r"^#{1,6} (.+)$", line)
        if heading:
            slug = github_slug(heading.group(1))
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
        found.update(HTML_ID.findall(line))
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with a page's relative links, each as ``path:line: problem``."""
    problems = []
    for number, line in _outside_code(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            if not where.exists():
                problems.append(f"{page.relative_to(root)}:{number}: no file {path}")
            elif anchor and where.suffix == ".md" and anchor not in anchors_of(where):
                problems.append(
                    f"{page.relative_to(root)}:{number}: no #{anchor} in {path or 'it'}"
                )
    return problems


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_readme_is_a_front_door_that_links_into_the_site() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.split("\n")) <= 200
    linked = {target.partition("#")[0] for target in LINK.findall(readme)}
    for section in ("guide", "operate", "internals"):
        assert any(link.startswith(f"docs/{section}/") for link in linked), section
    assert {"docs/guarantees.md", "docs/benchmarks.md"} <= linked
    assert "sphinx-build -W docs docs/_build/html" in readme


def test_the_api_reference_documents_every_public_name() -> None:
    reference = (DOCS / "reference" / "api.md").read_text()
    documented = set(
        re.findall(r"^\.\. auto\w+:: rabbitkeys\.(?:testing\.|celery\.)?(\w+)", reference, re.M)
    )
    assert set(rabbitkeys.__all__) - documented == set()
    assert set(rabbitkeys.testing.__all__) - documented == set()
    assert set(rabbitkeys.celery.__all__) - documented == set()


def test_the_link_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text('# A `title`\n\n## Some thing (here)\n\n<a id="row-1"></a>\n')
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#a-title) [ok](a.md#some-thing-here) [ok](a.md#row-1) [ok](https://x/y.md#z)\n"
        "[bad](a.md#nothing) [bad](missing.md) `[code](missing.md)`\n"
        "```\n[in a block](missing.md)\n```\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "b.md:2: no #nothing in a.md",
        "b.md:2: no file missing.md",
    ]


# --------------------------------------------------------------------------- the snippets


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    code: str
    not_run: str | None  # the reason, for a block marked not to run


def snippets_of(page: Path) -> list[Snippet]:
    """The ``python`` blocks of a page, in order."""
    lines = page.read_text().split("\n")
    found, index = [], 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if not opened:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith(opened.group(1)))
        if opened.group(2).strip() == "python":
            before = [line for line in lines[max(0, index - 2) : index] if line.strip()]
            marked = NOT_RUN.match(before[-1]) if before else None
            code = "\n".join(lines[index + 1 : end]) + "\n"
            found.append(Snippet(page, index + 1, code, marked and marked.group("reason")))
        index = end + 1
    return found


def run_snippet(snippet: Snippet, namespace: dict[str, Any]) -> None:
    """Run a block one top-level statement at a time: a statement that awaits runs in an
    event loop of its own, any other as plain code (so ``rabbitkeys.publish`` is not called
    from inside a loop, which it refuses)."""
    module = ast.parse(snippet.code, filename=str(snippet.page))
    for statement in module.body:
        tree = ast.increment_lineno(ast.Module([statement], []), snippet.line)
        code = compile(tree, str(snippet.page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        if code.co_flags & inspect.CO_COROUTINE:
            asyncio.run(eval(code, namespace))
        else:
            exec(code, namespace)


@contextlib.contextmanager
def registry_in_a_thread(settings: Settings) -> Iterator[None]:
    """A registry on a loop of its own thread, so new keys of the snippets get routed."""
    registry = Registry(settings)
    started: dict[str, Any] = {}
    leading = threading.Event()

    async def serve() -> None:
        started["loop"], started["task"] = asyncio.get_running_loop(), asyncio.current_task()
        async with registry:
            await registry.wait_leading()
            leading.set()
            await asyncio.Event().wait()  # until cancelled

    def thread_main() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(serve())

    thread = threading.Thread(target=thread_main, name="docs-registry", daemon=True)
    thread.start()
    assert leading.wait(15), "the registry did not lead within 15 s"
    try:
        yield
    finally:
        started["loop"].call_soon_threadsafe(started["task"].cancel)  # leaves `async with`
        thread.join(15)
        assert not thread.is_alive(), "the registry did not stop"


@pytest.fixture
def settings_in_the_environment(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``settings`` as the only ``RABBITKEYS_*`` variables (the tests' own kept): what the
    snippets' ``Publisher()`` and ``rabbitkeys.publish`` read."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX) and not name.upper().startswith(
            f"{ENV_PREFIX}TEST_"
        ):
            monkeypatch.delenv(name)
    for name, value in _settings_env(settings).items():
        monkeypatch.setenv(name, value)
    return settings


def test_the_guide_has_snippets_and_most_of_them_run() -> None:
    snippets = [snippet for page in GUIDE for snippet in snippets_of(page)]
    ran = [snippet for snippet in snippets if snippet.not_run is None]
    assert len(snippets) >= 8 and len(ran) > len(snippets) / 2, [s.line for s in snippets]


#: the Guide's pages with a block to run (in the others every block says why not)
RUNNABLE = [page for page in GUIDE if any(s.not_run is None for s in snippets_of(page))]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.stem)
def test_the_guides_snippets_run(page: Path, settings_in_the_environment: Settings) -> None:
    snippets = [snippet for snippet in snippets_of(page) if snippet.not_run is None]
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    with registry_in_a_thread(settings_in_the_environment):
        try:
            for snippet in snippets:
                try:
                    run_snippet(snippet, namespace)
                except Exception as exc:
                    raise AssertionError(
                        f"{page.relative_to(ROOT)}:{snippet.line}: {exc!r}"
                    ) from exc
        finally:
            rabbitkeys.close_default_publisher()
