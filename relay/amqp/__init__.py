"""The AMQP side: the supervised broker link, publishing with publisher confirms, the wire
format, topology and the RPC link."""
