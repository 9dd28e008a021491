"""Experiments built from the project's commands (each module documents its protocol)."""
