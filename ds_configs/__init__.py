"""DeepSpeed JSON configs, found by name (`parallel.deepspeed=zero2`); shipped as package data."""
