"""Offline build: train EfficientNet-Lite0, export ONNX, quantize to INT8, gate it, write the bundle."""
