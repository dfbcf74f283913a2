"""syncd: keeps local directory trees in sync with remote storage."""

__version__ = "0.1.0"
