"""Grouping reports, edge bundles, the torch-free runtime and SuperNode deployment helpers."""
