"""Triton kernels of the `ai.edgecompress` ops (CUDA path), their tile configs and torch launchers.

`configs.py` is the one list of compiled kernels (what the AOT generator builds and the C++ launch
path picks from); `ops.py` launches them from Python (interpreter tests, GPU JIT cross-check).
"""
