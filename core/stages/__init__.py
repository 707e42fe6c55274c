"""The five stage functions and the runner that calls them by name."""
