"""Custom onnxruntime op library (C++/CUDA) and its Python loader.

`library_path`, `build_library`, `register` and `manifest` (kernels/library.py) find, build, load and
describe libedgecompress_ops.so; `reference` is the NumPy definition of the ops. Torch-free.
"""

from .library import KernelLibraryError, build_library, library_info, library_path, manifest, register

__all__ = ["KernelLibraryError", "build_library", "library_info", "library_path", "manifest", "register"]
