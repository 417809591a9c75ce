"""REST API of the jobs app (DRF)."""
