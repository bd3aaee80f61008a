"""onnxruntime sessions, generation, evaluation and profiling.

Imports only onnxruntime, numpy and tokenizers (plus the standard library): this is what an app on
the device needs, and a test enforces that torch and transformers stay out.
"""

from edgecompress.folder_names import defer_to_installed, imported_by_folder_name

if imported_by_folder_name(__name__):  # the clone is on sys.path: this is not edgecompress.runtimes
    defer_to_installed(__name__, __file__)
