"""lastlayer: retrain the last layer of a pretrained image network on your own labelled photos."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lastlayer")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
