"""The HTTP edge: the aiohttp application, access control, health, the status page and TLS."""
