"""NBD export of a volume: protocol constants and a server over the upstairs."""
