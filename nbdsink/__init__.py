"""nbdsink: continuous block-level replication over NBD, every point in time kept."""

__version__ = "0.1.0"
