"""Probes, metrics, tracing and logs: what a running process tells about itself."""
