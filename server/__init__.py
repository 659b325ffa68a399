"""Flower ServerApp: the coordinator of a PAPM run."""
