"""The downstairs: serves one region to upstairs over TCP, plus a repair HTTP server."""
