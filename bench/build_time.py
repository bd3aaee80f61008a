"""Build time of `edgecompress build smollm2-135m --ratio 0.2 --weights int4`, this tree against an
earlier commit, measured in one run with the builds interleaved (old, new, old, new, ...), so the
machine's drift spreads over both. Each build is a child process; its stage timings and peak RSS
come from its own report.json.

The earlier commit is a plain checkout (e.g. `git worktree add /tmp/ec-before <commit>`); this script
lays its package out as an installed one (passes/, runtimes/, ... under edgecompress/) in a temporary
folder of symlinks and puts that first on PYTHONPATH for the "before" builds. Data: the build's own
resolution ($EDGECOMPRESS_DATA); the older code reads EDGECOMPRESS_WIKITEXT_DIR and a shared/ folder
beside the working directory, which is set up the same way here.

Usage: python bench/build_time.py --before-src /tmp/ec-before [--after-src /tmp/ec-after] [--rounds 2]
Writes bench/results/build-time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from edgecompress.folder_names import FOLDERS as NAMESPACED
from edgecompress.report import machine_description

RESULTS = Path(__file__).parent / "results" / "build-time.json"
COMMAND = ["build", "smollm2-135m", "--ratio", "0.2", "--weights", "int4"]


def installed_layout(src: Path, into: Path) -> Path:
    """`into/edgecompress/` with every entry of src/edgecompress and src/<folder> as <folder>, by symlink."""
    package = into / "edgecompress"
    package.mkdir(parents=True)
    for entry in (src / "edgecompress").iterdir():
        (package / entry.name).symlink_to(entry)
    for folder in NAMESPACED:
        if (src / folder).is_dir() and not (package / folder).exists():
            (package / folder).symlink_to(src / folder)
    return into


def one_build(label: str, env: dict, out: Path, cwd: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-P", "-m", "edgecompress.cli", *COMMAND, "-o", str(out), "-q"],
                            capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{label} build failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    report = json.loads((out / "report.json").read_text())
    return {
        "tree": label,
        "wall_seconds": round(wall, 1),
        "report_total_seconds": report["total_seconds"],
        "stage_seconds": report["timings_s"],
        "peak_rss_mb": report["peak_rss_mb"],
        "perplexity": (report.get("evaluation") or {}).get("perplexity"),
        "achieved_ratio": report["compression"]["params"]["achieved_ratio"],
        "load_average_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-src", type=Path, help="checkout of the earlier commit")
    parser.add_argument("--summarize", action="store_true", help="recompute the summary of the results file's rows")
    parser.add_argument("--after-src", type=Path, help="checkout of the later commit (default: the installed package)")
    parser.add_argument("--label-before", default="before")
    parser.add_argument("--label-after", default="after")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.summarize:
        record = json.loads(RESULTS.read_text())
        trees = list(dict.fromkeys(row["tree"] for row in record["rows"]))
        record["summary"] = summarize(record["rows"], trees[0], trees[1])
        RESULTS.write_text(json.dumps(record, indent=2) + "\n")
        return print(json.dumps(record["summary"], indent=2))
    if args.before_src is None:
        raise SystemExit("--before-src is required (a checkout of the earlier commit)")
    data = os.environ.get("EDGECOMPRESS_DATA")
    if not data:
        raise SystemExit("set EDGECOMPRESS_DATA to the WikiText-2 folder (make sets it): both trees calibrate on it")

    record = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_description(),
              "command": "edgecompress " + " ".join(COMMAND), "rows": []}
    with tempfile.TemporaryDirectory(prefix="ec-build-time-") as tmp:
        tmp = Path(tmp)
        before_path = installed_layout(args.before_src.resolve(), tmp / "before-site")
        # The older code looks for ../shared/data/wikitext-2 beside its working directory.
        cwd = tmp / "work" / "cwd"
        cwd.mkdir(parents=True)
        (tmp / "work" / "shared" / "data").mkdir(parents=True)
        (tmp / "work" / "shared" / "data" / "wikitext-2").symlink_to(Path(data).resolve())
        after_env = dict(os.environ)
        if args.after_src:
            after_env["PYTHONPATH"] = str(installed_layout(args.after_src.resolve(), tmp / "after-site"))
        envs = {
            args.label_before: {**os.environ, "PYTHONPATH": str(before_path), "EDGECOMPRESS_WIKITEXT_DIR": data},
            args.label_after: after_env,
        }
        for round_index in range(args.rounds):
            for label, env in envs.items():
                out = tmp / f"{label}-{round_index}"
                row = one_build(label, env, out, cwd)
                row["round"] = round_index
                record["rows"].append(row)
                print(json.dumps(row), flush=True)
    record["summary"] = summarize(record["rows"], args.label_before, args.label_after)
    record["machine"]["load_average_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["summary"], indent=2))


# Stages whose work the consolidation changed: graph passes, saving and re-loading the model.
GRAPH_IO_STAGES = ("passes", "save", "optimize")


def summarize(rows: list[dict], before: str, after: str) -> dict:
    """Medians per tree: wall time, the graph/IO stages, the time outside any stage (folder copies),
    and the ratios after/before; perplexities, which must be identical (no change in behaviour)."""
    summary: dict = {}
    for label in (before, after):
        mine = [row for row in rows if row["tree"] == label]
        summary[label] = {
            "median_wall_seconds": statistics.median(row["wall_seconds"] for row in mine),
            "walls": [row["wall_seconds"] for row in mine],
            "median_graph_io_stage_seconds": round(statistics.median(
                sum(row["stage_seconds"].get(stage, 0.0) for stage in GRAPH_IO_STAGES) for row in mine), 2),
            "median_seconds_outside_stages": round(statistics.median(
                row["report_total_seconds"] - sum(row["stage_seconds"].values()) for row in mine), 2),
            "median_peak_rss_mb": statistics.median(row["peak_rss_mb"] for row in mine),
            "perplexities": sorted({row["perplexity"] for row in mine}),
        }
    for key in ("median_wall_seconds", "median_graph_io_stage_seconds", "median_peak_rss_mb"):
        summary[f"after_over_before_{key}"] = round(summary[after][key] / summary[before][key], 3)
    summary["graph_io_stages"] = list(GRAPH_IO_STAGES)
    return summary


if __name__ == "__main__":
    main()
