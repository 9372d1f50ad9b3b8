"""Crucible in Python: a network-replicated block storage service."""

__version__ = "0.1.0"
