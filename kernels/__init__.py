"""Custom onnxruntime op library (C++/CUDA) and its Python loader.

`library_path`, `build_library`, `register` and `manifest` (kernels/library.py) find, build, load and
describe libedgecompress_ops.so; `reference` is the NumPy definition of the ops. Torch-free.
"""

from edgecompress.folder_names import defer_to_installed, imported_by_folder_name

if imported_by_folder_name(__name__):  # the clone is on sys.path: this is not edgecompress.kernels
    defer_to_installed(__name__, __file__)
else:
    from .library import KernelLibraryError, build_library, library_info, library_path, manifest, register

    __all__ = ["KernelLibraryError", "build_library", "library_info", "library_path", "manifest", "register"]
