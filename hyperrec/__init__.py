"""hyperrec: a low-latency gRPC recommendation server."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hyperrec")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
