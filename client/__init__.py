"""Flower ClientApp: the edge node side of a PAPM run (handlers, the message records, failure drills)."""
