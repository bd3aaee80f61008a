"""Peak memory of the default compressed build (issue 24's 4 GB goal): `edgecompress build smollm2-135m --ratio R`
run as a user runs it (the CLI, its own process), then report.json's peak RSS, the attribution stages' seconds and
peaks so far, the plan hash and the build's 40-window perplexity, beside the earlier measurement in
bench/results/quality.json (`default_build`). Writes bench/results/build-memory.json.

    python bench/build_memory.py [--ratio 0.2]

Needs EDGECOMPRESS_DATA (calibration and evaluation on WikiText-2).
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

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    args = parser.parse_args()
    if not os.environ.get("EDGECOMPRESS_DATA"):
        raise SystemExit("EDGECOMPRESS_DATA is not set: the protocol calibrates and evaluates on WikiText-2")
    with tempfile.TemporaryDirectory(prefix="ec-memory-") as tmp:
        out = Path(tmp) / "out"
        load_before, started = os.getloadavg(), time.perf_counter()
        command = [sys.executable, "-P", "-m", "edgecompress.cli", "build", "smollm2-135m", "--ratio", str(args.ratio),
                   "-o", str(out), "-q"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"build failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        wall = time.perf_counter() - started
        report = json.loads((out / "report.json").read_text())
        plan = json.loads((out / "plan" / "plan.json").read_text())
    before = json.loads((RESULTS / "quality.json").read_text()).get("default_build", {}).get(str(args.ratio), {})
    row = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "load_average_before": load_before,
        "command": f"edgecompress build smollm2-135m --ratio {args.ratio}",
        "build_wall_seconds": round(wall, 1),
        "peak_rss_mb": report["peak_rss_mb"],
        "attribute_stages": report["compression"].get("attribute_stages"),
        "plan_hash": plan["plan_hash"],
        "method": plan["method"],
        "perplexity_40_windows": (report.get("evaluation") or {}).get("perplexity"),
        "earlier": {"created": before.get("created"), "peak_rss_mb": before.get("peak_rss_mb"),
                    "attribute_stages": before.get("attribute_stages"),
                    "perplexity_40_windows": before.get("perplexity_40_windows")},
    }
    (RESULTS / "build-memory.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps({k: row[k] for k in ("peak_rss_mb", "build_wall_seconds", "perplexity_40_windows", "earlier")},
                     indent=2))


if __name__ == "__main__":
    main()
