"""mcpresd: the local resource broker daemon."""

__version__ = "0.1.0"
