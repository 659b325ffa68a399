"""Flower ClientApp: the edge node side of a PAPM run."""
