"""The upstairs: replicates a volume's IO to three downstairs."""
