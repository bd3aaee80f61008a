"""The end-to-end refit's learning rate, chosen on held-out calibration windows (issue 13).

The default build's plan stage (`auto` at --ratio, 128 + 8 windows of WikiText-2 validation, as
`edgecompress build` draws them) runs once per learning rate; each run's refit is measured on the 8
held-out calibration windows (KL of the logits against the dense model), never on test text. The rate
with the lowest held-out KL is the one to keep as methods.KL_REFIT_DEFAULTS. Writes
bench/results/refit-lr.json.

Usage: python bench/refit_lr.py [--ratio 0.2] [--lrs 5e-4 1e-3 2e-3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--lrs", type=float, nargs="*", default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--out", type=Path, default=RESULTS / "refit-lr.json")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out (same calibration)")
    parser.add_argument("--include-plan", type=Path, default=None,
                        help="a plan.json built by `edgecompress build` with the same settings at the default rate "
                             "(the computation is deterministic): its refit is a row instead of a rerun")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from edgecompress import models
    from edgecompress.calibrate import build_calibration
    from edgecompress.compress import make_plan
    from edgecompress.options import DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_SEQUENCES
    from edgecompress.report import machine_description

    loaded = models.load(models.resolve(MODEL))
    calib = build_calibration(None, loaded.tokenizer, DEFAULT_CALIB_SEQUENCES, DEFAULT_CALIB_SEQ_LEN, None,
                              model=loaded.model, generation_config=loaded.generation_config, holdout=None)
    machine = machine_description()
    machine["load_average_at_start"] = list(os.getloadavg())
    rows = [] if args.include_plan is None else [_plan_row(args.include_plan)]
    if args.resume and args.out.exists():
        rows += [row for row in json.loads(args.out.read_text())["rows"]
                 if row.get("calibration_hash") == calib.describe()["hash"] and row["lr"] not in {r["lr"] for r in rows}]
    for lr in args.lrs:
        started = time.perf_counter()
        plan = make_plan(loaded.model, calib, "auto", args.ratio, refit_lr=lr)
        refit = plan.scores["refit"]["end-to-end"]
        rows.append({"lr": lr, "holdout_before": refit["holdout_before"], "holdout_best": refit["holdout_best"],
                     "best_step": refit["best_step"], "steps": refit["steps"], "holdout_history": refit["holdout_history"],
                     "method_resolved": plan.method, "achieved_ratio": plan.params["achieved_ratio"],
                     "seconds": round(time.perf_counter() - started, 1), "stages": plan.attribute_stages,
                     "calibration_hash": calib.describe()["hash"]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "holdout_history"}), flush=True)
        _write(args.out, machine, args.ratio, calib, rows)  # after every row: a stopped run keeps what it measured
    best = _write(args.out, machine, args.ratio, calib, rows)
    print(f"chosen lr {best['lr']:g} (held-out KL {best['holdout_best']:.4f}) -> {args.out}")


def _write(out: Path, machine: dict, ratio: float, calib, rows: list) -> dict:
    from edgecompress.methods import KL_REFIT_DEFAULTS

    machine = {**machine, "load_average_at_end": list(os.getloadavg())}
    best = min(rows, key=lambda row: row["holdout_best"])
    record = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "protocol": {"model": MODEL, "ratio": ratio, "method": "auto", "calibration": calib.describe(),
                     "measure": "KL(dense || compressed) of the logits on the held-out calibration windows "
                                "(no test text)", "steps": KL_REFIT_DEFAULTS[0]},
        "rows": sorted(rows, key=lambda row: row["lr"]),
        "chosen_lr": best["lr"],
        "default_lr_at_run": KL_REFIT_DEFAULTS[1],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return best


def _plan_row(path: Path) -> dict:
    plan = json.loads(path.read_text())
    refit = plan["scores"]["refit"]["end-to-end"]
    return {"lr": plan["settings"]["refit_lr"], "holdout_before": refit["holdout_before"],
            "holdout_best": refit["holdout_best"], "best_step": refit["best_step"], "steps": refit["steps"],
            "holdout_history": refit["holdout_history"], "method_resolved": plan["method"],
            "achieved_ratio": plan["params"]["achieved_ratio"], "from_build_plan": str(path),
            "calibration_hash": plan["calibration"]["hash"]}


if __name__ == "__main__":
    main()
