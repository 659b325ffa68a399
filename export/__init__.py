"""ONNX export, PyTorch/ONNX parity checks and INT8 quantisation."""
