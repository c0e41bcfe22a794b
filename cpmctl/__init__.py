"""cpmctl: a command-line toolkit for CPM-style Chinese language models."""

__version__ = "0.1.0"
