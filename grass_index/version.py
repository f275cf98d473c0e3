"""The library's version: recorded in every config.json (``version``); a leaf, so the stages
can import it without importing the package root."""
__version__ = "0.1.0"
