"""`lamabus replay`: a topic's conversation read back from JetStream."""
