"""dreamd: a continuous dream-loop training daemon."""

__version__ = "0.1.0"
