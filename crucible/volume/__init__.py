"""Volumes: what a guest sees, built from a Volume Construction Request."""
