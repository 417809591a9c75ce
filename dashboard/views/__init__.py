"""Dashboard views, one module per area. Each finds what the URL names through the same
selectors as the API (404 for what the person may not see), checks the same permission rule
(403 with a page saying who may), and calls the same service."""
