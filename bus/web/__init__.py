"""The node's HTTP servers: the chat page and /metrics, on loopback listeners."""
