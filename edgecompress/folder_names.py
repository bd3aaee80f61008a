"""The repo's top-level folders (passes/, runtimes/, kernels/, targets/) install as edgecompress.<folder>.

Started in a clone, Python puts the clone on sys.path (`python` in the folder, `python -m`, a script
there), so `import kernels` would find our kernels/ before site-packages: transformers imports Hugging
Face's `kernels` distribution and broke on ours (issue 23). Each folder's `__init__.py` calls
`defer_to_installed` first when it is imported under its bare folder name: the distribution of that
name is loaded in its place, or the import fails as it would without the clone on sys.path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import PathFinder

FOLDERS = ("passes", "runtimes", "kernels", "targets")  # setup.py installs each as edgecompress.<folder>


def imported_by_folder_name(module_name: str) -> bool:
    """True when a folder's package runs as `kernels` (say) instead of `edgecompress.kernels`."""
    return module_name in FOLDERS


def defer_to_installed(module_name: str, init_file: str) -> None:
    """Replace the half-imported folder package `module_name` with the installed one of that name.

    The search skips the clone (the folder's parent, which sys.path holds as '' or as a path), so it
    finds what Python would have found without it; none found raises ModuleNotFoundError.
    """
    clone = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(init_file))))
    others = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != clone]
    spec = PathFinder.find_spec(module_name, others)
    if spec is None or spec.loader is None:
        del sys.modules[module_name]
        raise ModuleNotFoundError(
            f"No module named {module_name!r} (the folder {module_name}/ of this clone is "
            f"edgecompress.{module_name})", name=module_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # the import statement returns sys.modules[name]
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
