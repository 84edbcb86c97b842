"""Dedup stores: the dedup key and the in-memory store, and the shared Redis store."""
