"""The spool: the local durable store (SQLite) and the forwarder that drains it to the broker."""
