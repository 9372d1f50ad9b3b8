"""A region: region.json plus extent files, the downstairs' on-disk store."""
