"""The spdjax version (written into exported decompositions)."""

__version__ = "0.1.0"
