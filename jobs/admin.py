"""Django admin for the jobs app; models are registered here as issue 4 adds them."""
