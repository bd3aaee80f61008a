"""python -m edgecompress.kernels [--build] [--force] [--out DIR]: build (or find) and describe the library."""

import sys

from .library import main

sys.exit(main())
