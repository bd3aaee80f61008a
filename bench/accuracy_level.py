"""MatMulNBits accuracy level 4 (int8 activations, the cpu-x86 default) against level 0 (fp32 activations) on the
fused int4 smollm2-135m artifact (issue 26, stage 3): greedy tokens, perplexity and decode time, in one run.

The artifact is built by this version (`edgecompress build smollm2-135m --weights int4`, whose verification now
also reports the level-0 greedy tokens); its level-0 twin is the same folder with every MatMulNBits'
accuracy_level set to 0. Measured on both: greedy continuations of a few prompts (32 tokens), perplexity on
WikiText-2 test windows (EDGECOMPRESS_DATA), and decode steps after a 512-token prefill, interleaved, 2 threads.
Writes bench/results/accuracy-level.json.

    python bench/accuracy_level.py [--windows 40] [--steps 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: -P (PYTHONSAFEPATH) leaves it off
from decode_timing import add_arguments, decode_times  # noqa: E402

from edgecompress import contract
from edgecompress.report import machine_description

RESULTS = Path(__file__).resolve().parent / "results" / "accuracy-level.json"
PROMPTS = ["The history of the city begins", "Why is the sky blue?", "In 1998, the band released",
           "The main difference between a virus and a bacterium is"]


def level_zero_copy(artifact: Path, into: Path) -> Path:
    import onnx

    shutil.copytree(artifact, into)
    model = onnx.load(str(into / contract.MODEL_FILE), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                attribute.i, changed = 0, changed + 1
    if not changed:
        raise SystemExit(f"{artifact} has no MatMulNBits with an accuracy level")
    onnx.save(model, str(into / contract.MODEL_FILE))
    return into


def greedy_rows(folders: dict[str, Path], threads: int) -> dict:
    from edgecompress.runtimes.artifact_files import load_tokenizer
    from edgecompress.runtimes.decoder import OrtDecoder

    tokenizer = load_tokenizer(folders["level4"])
    decoders = {label: OrtDecoder(folder, threads=threads) for label, folder in folders.items()}
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        tokens = {label: decoder.greedy(ids, 32) for label, decoder in decoders.items()}
        first = next((i for i, (a, b) in enumerate(zip(tokens["level4"], tokens["level0"])) if a != b), 32)
        rows.append({"prompt": prompt, "identical": tokens["level4"] == tokens["level0"], "first_difference": first,
                     "level4": tokenizer.decode(tokens["level4"]), "level0": tokenizer.decode(tokens["level0"])})
    return {"prompts": rows, "identical": sum(row["identical"] for row in rows)}


def decode_rows(folders: dict[str, Path], threads: int, steps: int, repeats: int) -> dict:
    median, samples = decode_times(folders, threads, steps, repeats)
    return {"ms_per_token_median": median, "ratio_level4_over_level0": round(median["level4"] / median["level0"], 3),
            "samples_ms": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    from edgecompress import api

    with tempfile.TemporaryDirectory(prefix="ec-level-") as tmp:
        level4 = Path(tmp) / "int4"
        command = [sys.executable, "-P", "-m", "edgecompress.cli", "build", "smollm2-135m", "--weights", "int4",
                   "--eval-limit", "0", "-o", str(level4), "-q"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"build failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        report = json.loads((level4 / contract.REPORT_FILE).read_text())
        folders = {"level4": level4, "level0": level_zero_copy(level4, Path(tmp) / "int4-level0")}
        row = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(),
            "load_average_at_start": os.getloadavg(),
            "artifact": "edgecompress build smollm2-135m --weights int4 (cpu-x86: fused, block 32, accuracy level 4)",
            "verification_greedy_level0": report["verification"]["optimized"]["greedy"].get("accuracy_level_0"),
            "greedy": greedy_rows(folders, args.threads),
            "perplexity": {label: api.eval(folder, limit=args.windows)["perplexity"] for label, folder in folders.items()},
            "windows": args.windows,
            "decode_after_512": decode_rows(folders, args.threads, args.steps, args.repeats),
            "threads": args.threads,
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "decode_after_512"}, indent=2))
    print(json.dumps(row["decode_after_512"]["ms_per_token_median"]))


if __name__ == "__main__":
    main()
