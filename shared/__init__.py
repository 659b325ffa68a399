"""Pure PyTorch core used by both the server and the clients (no Flower import)."""
