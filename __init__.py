"""PAPM-FL: class-specialised, PAPM-pruned ResNets split across edge devices.

The import package `papm` maps the repository's top-level folders (server/,
client/, shared/, deploy/, export/, simulations/) to its subpackages.
Nothing heavy is imported here: the edge runtime must import without torch.
"""

__version__ = "0.1.0"
