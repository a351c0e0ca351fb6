"""The package version (one place; the root package, the CLI and pyproject read it)."""
__version__ = "0.1.0"
