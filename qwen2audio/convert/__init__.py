"""Converters from third-party checkpoint formats to this package's state dicts."""
