"""What a user gets from the default compressed build (issue 24): `edgecompress build smollm2-135m --ratio R`
with no other option, run exactly as a user runs it (the CLI, in its own process), then the artifact's
perplexity on the whole WikiText-2 test split. Writes `default_build` into bench/results/quality.json:
the build's wall time, its per-stage seconds and peak RSS from report.json, the machine and its load.

    python bench/default_build.py [--ratio 0.2] [--keep OUT]

Needs EDGECOMPRESS_DATA (the Makefile sets it) so calibration and evaluation use WikiText-2. Run it on an
otherwise idle machine: the seconds are the cost goal's (10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from edgecompress.report import machine_description

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--keep", type=Path, help="build into this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    if not os.environ.get("EDGECOMPRESS_DATA"):
        raise SystemExit("EDGECOMPRESS_DATA is not set: the protocol calibrates and evaluates on WikiText-2")
    from edgecompress.runtimes.perplexity import perplexity

    with tempfile.TemporaryDirectory(prefix="ec-default-") as tmp:
        out = args.keep or Path(tmp) / "out"
        load_before = os.getloadavg()
        started = time.perf_counter()
        command = [sys.executable, "-P", "-m", "edgecompress.cli", "build", "smollm2-135m", "--ratio", str(args.ratio),
                   "-o", str(out), "--force", "-q"]
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"build failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        report = json.loads((out / "report.json").read_text())
        compression = report["compression"]
        whole = perplexity(out, limit=None)
        row = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(),
            "command": "edgecompress build smollm2-135m --ratio " + str(args.ratio),
            "method": compression["method"],
            "method_requested": compression["settings"].get("method_requested"),
            "calibration": compression["calibration"],
            "achieved_ratio": compression["params"]["achieved_ratio"],
            "build_wall_seconds": round(wall, 1),
            "stage_seconds": report["timings_s"],
            "attribute_stages": compression.get("attribute_stages"),
            "peak_rss_mb": report["peak_rss_mb"],
            "perplexity_40_windows": (report.get("evaluation") or {}).get("perplexity"),
            "perplexity_whole_split": whole["perplexity"],
            "whole_split_windows": whole.get("windows"),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        }
    record = json.loads(RESULTS.read_text())
    record.setdefault("default_build", {})[f"{args.ratio:g}"] = row
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
