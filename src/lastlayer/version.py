"""The installed lastlayer's version (``0.0.0`` when running from a source tree that is not installed)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lastlayer")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
