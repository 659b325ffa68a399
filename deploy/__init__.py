"""Deliverables: the group report, edge bundles (assembly, manifest, signature), the torch-free
ONNX Runtime split inference, and the SuperNode deployment kit."""
