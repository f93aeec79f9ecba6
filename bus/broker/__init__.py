"""The NATS broker: connecting to one, or running the embedded nats-server."""
