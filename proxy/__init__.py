"""dsml-proxy: the aiohttp application in front of DeepSeek-V4 engines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dsml-proxy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
