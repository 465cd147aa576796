"""The version of dropinf, in one place: ``dropinf.__version__``, the store's manifests and
pyproject.toml (``[tool.setuptools.dynamic]``) read it from here."""

__version__ = "0.1.0"
