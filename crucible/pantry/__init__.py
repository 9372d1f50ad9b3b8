"""The pantry: an HTTP service that attaches volumes and fills, reads, checks and snapshots them."""
