"""The one home of the package's version.

``pyproject.toml`` reads it from here (``[tool.setuptools.dynamic]``), ``rabbitkeys.__version__``
re-exports it, and the metrics' ``rabbitkeys_info`` carries it in its ``version`` label. Read
from the source rather than from installed metadata, so an editable install never reports a
stale version.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
