"""Ahead-of-time compilation of the Triton kernels to cubins (no GPU needed).

`python -m edgecompress.kernels.aot --out DIR` writes ec_cubins.h (cubins + PTX + launch table), one
.cubin/.ptx per entry and manifest.json; see docs/custom-ops.md, "Kernels".
"""

from edgecompress.errors import EdgeCompressError


class KernelBuildError(EdgeCompressError):
    """A kernel that cannot be shipped (scratch, shared memory over the SM's limit, ABI surprises...)."""
