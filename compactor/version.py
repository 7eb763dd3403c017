"""compactor's version: a module of its own, so any layer can name it without importing
the package's public API (which sits above everything)."""

__version__ = "0.1.0"
