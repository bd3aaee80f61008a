"""ONNX graph passes (onnx-ir only; never imports torch)."""
