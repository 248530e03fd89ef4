"""Sphinx configuration of the rabbitkeys documentation site.

Build it with ``sphinx-build -W docs docs/_build/html`` (the README's command; CI adds
``--keep-going -n`` in ``tests/test_docs.py``). Pages are MyST Markdown; the CLI reference is
rendered from the real parser (sphinx-argparse) and the API reference from the docstrings.
"""

from __future__ import annotations

from rabbitkeys import __version__

project = "rabbitkeys"
author = "the rabbitkeys authors"
copyright = "the rabbitkeys authors"
release = __version__
version = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinxarg.ext",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
# docs/probes/ and docs/bench/ are scripts and measurements, not pages
exclude_patterns = ["_build", "probes", "bench", "**/.*"]

# Headings up to #### get GitHub-style anchors, so a link written for GitHub
# (page.md#a-heading) resolves on the site too and tests/test_docs.py can check it.
myst_heading_anchors = 4
# `(alert-x)=` targets are not used: the alerts table keeps GitHub-visible <a id> anchors
myst_enable_extensions = ["colon_fence", "deflist"]

html_theme = "furo"
html_title = f"rabbitkeys {release}"

# the API reference: what the docstrings say, in source order, with the types of the signature
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

# -n (nitpicky) flags every type it cannot resolve; these come from libraries without an
# inventory here (no network in CI) or are private names a public signature mentions.
nitpick_ignore_regex = [
    (r"py:.*", r"(aio_pika|aiormq|pamqp|pydantic|pydantic_settings|prometheus_client|yarl)\..*"),
    (r"py:.*", r"(celery|kombu|billiard)\..*"),
    (r"py:.*", r"rabbitkeys\._.*"),
    (r"py:.*", r"(asyncio|concurrent\.futures|collections|typing|types|enum|pathlib)\..*"),
    (r"py:.*", r"annotated_types\..*"),
    # a docstring of rabbitkeys.testing names the class without its module
    (r"py:class", r"StartupError"),
]
