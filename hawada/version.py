"""The package version, read by the build (pyproject `dynamic = ["version"]`) and the API."""

__version__ = "0.1.0"
