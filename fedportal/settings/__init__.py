"""Settings package: `base` reads everything from the environment; `test` overrides for tests."""
