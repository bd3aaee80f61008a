"""Quality benchmark (issue 3): perplexity kept per parameter removed, for every method and ratio.

Protocol (shared/docs/reference-points.md): smollm2-135m, calibration windows of 512 tokens from the
start of WikiText-2 validation (`wiki.valid.tokens`; `--calib-sequences`, default the build's 128, and
`--calib-holdout` more kept out of fitting; the first protocol used 16 and none), perplexity over the
first 40 non-overlapping 512-token windows of `wiki.test.raw`, ratio = fraction of ALL parameters removed.

The dense model is exported and verified once (`edgecompress build`); each (method, ratio,
calibration) then runs the build's own plan stage (calibrate + attribute) in a child process (so its
wall time and peak RSS are its own), and the build's graph stage applies the plan to the dense export
in memory; perplexity is measured on that ONNX model through onnxruntime. `--calibration self` uses
text the model generates itself (`edgecompress build --calibration self`). Data: $EDGECOMPRESS_DATA
(the Makefile points it at the WikiText-2 copy), as in a build. Writes bench/results/quality.json,
quality.md and quality.png.

Structures: `--structures lowrank monarch blast` (or `METHOD@RATIO@STRUCTURE` in --order) builds the same
method with Monarch / BLAST Linears at the parameter count of its low-rank ones (`--blocks`, default the
build's); each row states its structure and blocks (rows without one are low-rank).

Usage: python bench/quality.py [--ratios 0.1 0.2 0.3] [--methods ...] [--structures ...] [--calibration self]
       [--limit 40]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from edgecompress.options import DEFAULT_CALIB_SEQUENCES, holdout_windows
from edgecompress.report import machine_description, peak_rss_mb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "smollm2-135m"
DEFAULT_CALIBRATION = "wikitext-2"  # the rows calibrated on wiki.valid.tokens (the reference protocol)
REFERENCE = {  # shared/docs/reference-points.md, same protocol, independent reimplementations
    "dense": 28.74,
    ("shortgpt", 0.1): 54.3, ("grasp", 0.1): 55.2, ("shortgpt", 0.2): 122.0, ("grasp", 0.2): 120.7,
}


def child(method: str, ratio: float, plan_dir: Path, calib_sequences: int, seq_len: int,
          calibration: str | None, structure: str = "lowrank", blocks: int | None = None, holdout: int = 0) -> None:
    """The build's plan stage only: load, calibrate, attribute, save the plan; print cost as JSON."""
    import warnings

    warnings.simplefilter("ignore")
    from edgecompress import models, pipeline
    from edgecompress.options import CompressOptions

    loaded = models.load(models.resolve(MODEL))
    clock = pipeline.StageClock(pipeline.Progress())
    options = CompressOptions(method=method, ratio=ratio, calibration=calibration, calib_sequences=calib_sequences,
                              calib_seq_len=seq_len, calib_holdout=holdout, structure=structure, blocks=blocks)
    plan = pipeline.plan_stage(clock, loaded, options, None)
    plan.save(plan_dir)
    print(json.dumps({
        "compression_seconds": round(clock.timings["calibrate"] + clock.timings["attribute"], 1),
        "calibration_seconds": clock.timings["calibrate"],
        "peak_rss_mb": peak_rss_mb(),
        "achieved_ratio": plan.params["achieved_ratio"],
        "calibration_source": plan.calibration["source"],
        "calibration_windows": {"fit": plan.calibration["n_sequences"], "held_out": plan.calibration.get("holdout_sequences", 0),
                                "seq_len": plan.calibration["seq_len"]},
        "method_resolved": plan.method,
        "refit": _refit_summary(plan.scores.get("refit")),
        "layers": {a: plan.layers_with(a) for a in ("replace", "remove")},
        "params_after": plan.params["after"],
        "blocks": plan.settings.get("blocks"),
        "projection": next((lin.scores.get("projection") for lin in plan.low_rank_linears()), None),
    }))


def _refit_summary(refit: dict | None) -> dict | None:
    """The end-to-end refit's loss and held-out early stopping, without the per-layer numbers."""
    if not refit:
        return None
    end = refit.get("end-to-end", refit)
    return {k: v for k, v in end.items() if k != "holdout_history" and not isinstance(v, dict)} or None


def run_child(method: str, ratio: float, plan_dir: Path, args, structure: str = "lowrank") -> dict:
    command = [sys.executable, __file__, "--child", method, str(ratio), str(plan_dir),
               "--calib-sequences", str(args.calib_sequences), "--calib-holdout", str(_holdout(args)),
               "--seq-len", str(args.seq_len),
               "--structures", structure]
    if args.blocks is not None and structure != "lowrank":
        command += ["--blocks", str(args.blocks)]
    if args.calibration:
        command += ["--calibration", args.calibration]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def evaluate_plan(dense: Path, plan_dir: Path, work: Path, limit: int | None, seq_len: int) -> dict:
    """The build's plan passes on the dense export (one load, one save), then perplexity."""
    from edgecompress import artifact, export, graph_stages
    from edgecompress.plan import CompressionPlan
    from edgecompress.runtimes.perplexity import perplexity

    folder = work / "compressed"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model = graph_stages.load_model(dense)
    counts = graph_stages.run_stage(model, graph_stages.plan_passes(CompressionPlan.load(plan_dir)))
    export.save_model(model, folder)
    artifact.copy_sidecar_files(dense, folder)
    result = perplexity(folder, seq_len=seq_len, limit=limit)
    return {"perplexity": result["perplexity"], "passes": counts, "onnx_bytes": (folder / "model.onnx.data").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "RATIO", "PLAN_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--methods", nargs="+", default=["shortgpt", "svd", "svd-llm", "grasp", "grasp-w"])
    parser.add_argument("--limit", type=int, default=40, help="evaluation windows (0 = the whole test split)")
    parser.add_argument("--full", action="store_true", help="also evaluate the dense model on the whole split")
    parser.add_argument("--structures", nargs="+", default=["lowrank"], help="lowrank, monarch, blast")
    parser.add_argument("--blocks", type=int, help="Monarch/BLAST blocks (default: the build's)")
    parser.add_argument("--calib-sequences", type=int, default=DEFAULT_CALIB_SEQUENCES)
    parser.add_argument("--calib-holdout", type=int, default=None,
                        help="calibration windows held out (early stopping); rows say their calibration")
    parser.add_argument("--calibration", help="calibration spec as for `build --calibration` (e.g. self); "
                        "default: the build's default ($EDGECOMPRESS_DATA's wiki.valid.tokens)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dense-artifact", type=Path, help="reuse a dense artifact built for cpu-x86")
    parser.add_argument("--order", nargs="+", metavar="METHOD@RATIO[@STRUCTURE]",
                        help="run exactly these configurations, in this order (instead of ratios x methods)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in quality.json")
    parser.add_argument("--replace", action="store_true", help="with --resume: re-measure configurations that "
                        "have a row (the old row moves to superseded_rows, with the code that made it)")
    args = parser.parse_args()
    if args.child:
        method, ratio, plan_dir = args.child
        return child(method, float(ratio), Path(plan_dir), args.calib_sequences, args.seq_len, args.calibration,
                     args.structures[0], args.blocks, _holdout(args))

    from edgecompress import api
    from edgecompress.runtimes.perplexity import perplexity

    limit = args.limit or None
    record = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "protocol": {"model": MODEL, "calibration": "windows of 512 tokens from the start of wiki.valid.tokens: "
                     "each row's calibration says how many ('wikitext-2' alone: 16, none held out, the first protocol)",
                     "evaluation": f"first {args.limit or 'all'} non-overlapping "
                     f"{args.seq_len}-token windows of wiki.test.raw, onnxruntime CPU"},
        "reference_points": {f"{k[0]}@{k[1]}" if isinstance(k, tuple) else k: v for k, v in REFERENCE.items()},
        "rows": [],
    }
    if args.resume and (RESULTS / "quality.json").is_file():
        previous = json.loads((RESULTS / "quality.json").read_text())
        record["rows"] = previous["rows"]
        for key in ("dense_full_split", "notes", "superseded_rows"):  # measured or written by an earlier run
            if key in previous:
                record[key] = previous[key]
        # Rows keep the run (date and machine) that measured them; untagged rows are the earliest run's.
        record["earlier_runs"] = previous.get("earlier_runs", []) + [
            {"created": previous["created"], "machine": previous["machine"]}]
        for row in record["rows"]:
            row.setdefault("run", previous["created"])
    calibration = _calibration_label(args)
    done = {_key(r) for r in record["rows"]}
    configs = [_config(c) for c in args.order] if args.order else [
        (m, r, s) for r in args.ratios for m in args.methods for s in args.structures]
    if args.replace:
        wanted = {(m, r, calibration, s) for m, r, s in configs}
        old = [row for row in record["rows"] if _key(row) in wanted]
        record["superseded_rows"] = record.get("superseded_rows", []) + old
        record["rows"] = [row for row in record["rows"] if _key(row) not in wanted]
        done -= wanted
    with tempfile.TemporaryDirectory(prefix="ec-quality-") as tmp:
        work = Path(tmp)
        dense = args.dense_artifact
        if dense is None:
            dense = work / "dense"
            api.build(MODEL, "cpu-x86", dense)
        if ("dense", 0.0, DEFAULT_CALIBRATION, "lowrank") not in done:
            dense_ppl = perplexity(dense, seq_len=args.seq_len, limit=limit)
            record["rows"].append({"method": "dense", "target_ratio": 0.0, "achieved_ratio": 0.0,
                                   "perplexity": dense_ppl["perplexity"]})
            print("dense", dense_ppl["perplexity"], flush=True)
        if args.full:
            full = perplexity(dense, seq_len=args.seq_len, limit=None)
            record["dense_full_split"] = {"perplexity": full["perplexity"], "windows": full.get("windows")}
        for method, ratio, structure in configs:
            if (method, ratio, calibration, structure) in done:
                continue
            plan_dir = work / f"plan-{method}-{ratio}-{structure}"
            row = {"method": method, "target_ratio": ratio, "calibration": calibration, "structure": structure,
                   "run": record["created"], "code": _code_hash(),
                   **run_child(method, ratio, plan_dir, args, structure)}
            if "error" not in row:
                row.update(evaluate_plan(dense, plan_dir, work, limit, args.seq_len))
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
            _write(record)
    _write(record)


def _calibration_label(args) -> str:
    """'wikitext-2' for the first protocol (16 x 512, nothing held out), else with its size: 'wikitext-2 128+8'."""
    source = args.calibration or DEFAULT_CALIBRATION
    if args.calib_sequences == 16 and _holdout(args) == 0 and args.seq_len == 512:
        return source
    return f"{source} {args.calib_sequences}+{_holdout(args)}" + ("" if args.seq_len == 512 else f"x{args.seq_len}")


def _holdout(args) -> int:
    return holdout_windows(args.calib_sequences, args.calib_holdout)


def _key(row: dict) -> tuple:
    """What makes a row: method, ratio, calibration and structure (rows from before structures are low-rank)."""
    return row["method"], row["target_ratio"], row.get("calibration", DEFAULT_CALIBRATION), row.get("structure", "lowrank")


def _config(spec: str) -> tuple[str, float, str]:
    """METHOD@RATIO[@STRUCTURE] → (method, ratio, structure)."""
    method, ratio, *structure = spec.split("@")
    return method, float(ratio), structure[0] if structure else "lowrank"


def _code_hash() -> str:
    """Which compression code produced a row: sha256 of the PyTorch-side and pass sources."""
    import hashlib

    root = HERE.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("edgecompress/*.py"), *root.glob("edgecompress/attribution/*.py"),
                        *root.glob("passes/*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _write(record: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| method | structure | target | calibration | achieved ratio | WikiText-2 ppl | compression s | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    def order(row):
        return row["target_ratio"], row["method"], row.get("calibration", DEFAULT_CALIBRATION), _structure(row)

    for row in sorted(record["rows"], key=order):
        ppl = f"{row['perplexity']:.2f}" if "perplexity" in row else row.get("error", "?")
        calibration = row.get("calibration", DEFAULT_CALIBRATION) if row["method"] != "dense" else ""
        lines.append(f"| {row['method']} | {_structure(row) if row['method'] != 'dense' else ''} | "
                     f"{row['target_ratio']:.0%} | {calibration} | "
                     f"{row.get('achieved_ratio', 0):.4f} | {ppl} | "
                     f"{row.get('compression_seconds', '')} | {row.get('peak_rss_mb', '')} |")
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    _plot(record)


def _structure(row: dict) -> str:
    """lowrank, or e.g. monarch b=4."""
    structure = row.get("structure", "lowrank")
    if structure == "lowrank":
        return structure
    projection = f", {row['projection']}" if row.get("projection") else ""
    return f"{structure} b={row.get('blocks')}{projection}"


def _plot(record: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next(r["perplexity"] for r in record["rows"] if r["method"] == "dense")
    series = sorted({(r["method"], r.get("calibration", DEFAULT_CALIBRATION), _structure(r)) for r in record["rows"]
                     if r["method"] != "dense"})
    for method, calibration, structure in series:
        rows = [r for r in record["rows"] if r["method"] == method and "perplexity" in r
                and r.get("calibration", DEFAULT_CALIBRATION) == calibration and _structure(r) == structure]
        label = method if structure == "lowrank" else f"{method} {structure}"
        label = label if calibration == DEFAULT_CALIBRATION else f"{label} ({calibration} calibration)"
        if rows:
            style = {"lowrank": "o-", "monarch": "s--", "blast": "^:"}[structure.split()[0]]
            ax.plot([100 * r["achieved_ratio"] for r in rows], [r["perplexity"] for r in rows], style, label=label)
    ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense {dense:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (% of all, embeddings included)")
    ax.set_ylabel("WikiText-2 perplexity (40 x 512)")
    ax.set_title("smollm2-135m: quality kept per parameter removed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
