"""Training configs, found by path or by name (`--config tiny-cpu`); shipped as package data."""
