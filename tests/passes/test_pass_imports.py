"""Passes run where torch is absent: importing them must not pull it in."""

from __future__ import annotations

import subprocess
import sys


def test_passes_do_not_import_torch():
    code = (
        "import sys\n"
        "import edgecompress.passes.layer_map, edgecompress.passes.remove_layers\n"
        "import edgecompress.passes.low_rank_split, edgecompress.passes.replace_layers\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
