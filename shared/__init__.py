"""Pure PyTorch core used by both the server and the clients: models, data, training, class
statistics and grouping, APoZ/PAPM pruning, checkpoints, the run config (no Flower import)."""
