"""RETM's own flows: the install callback, the per-merchant token registry and the loyalty hooks."""
