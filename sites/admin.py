"""Django admin for the sites app; models are registered here as issue 3 adds them."""
