"""REST API of the sites app (DRF)."""
