"""Command-line entry point package (`medddpm`)."""
