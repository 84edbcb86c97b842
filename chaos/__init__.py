"""The chaos soak (make chaos): see soak.py."""
