"""Custom onnxruntime op library (C++/CUDA) and its Python loader."""
