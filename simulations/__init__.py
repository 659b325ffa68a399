"""One-machine simulated runs (`papm simulate`) on Flower's simulation engine."""
