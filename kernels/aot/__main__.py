"""python -m edgecompress.kernels.aot [--out DIR] [--sm 87 ...] [--dtype fp16 ...] [--kernel NAME ...]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgecompress.errors import EdgeCompressError

from .generate import DEFAULT_OUT, generate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgecompress.kernels.aot", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--sm", type=int, action="append", help="only these SMs (default: 86 87 89 90)")
    parser.add_argument("--dtype", action="append", help="only these dtypes (fp32 fp16 bf16)")
    parser.add_argument("--kernel", action="append", help="only these kernels")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        generate(args.out, kernels=args.kernel, dtypes=args.dtype, sms=args.sm, jobs=args.jobs, force=args.force)
    except EdgeCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # triton (or torch) missing: the generator cannot run at all
        print(f"error: the cubin generator needs Triton 3.9 (pip install triton): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
