"""The installed distribution's version (from its metadata, so it never disagrees with pip)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hf-splitquant")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
