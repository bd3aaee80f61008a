"""Apply a compression plan to an exported artifact with the ONNX graph passes.

The plan says what (layers to remove, factors for Linear layers); the passes do the graph surgery;
this module only reads the plan, runs the passes in order and rewrites the files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from edgecompress.export import DATA_FILE, MODEL_FILE


def apply_plan_to_artifact(folder: Path, plan: Any) -> dict[str, Any]:
    """Rewrite folder/model.onnx(+.data) and genai_config.json to match the plan; returns pass counts."""
    import onnx_ir as ir

    from edgecompress.passes.replace_layers import ReplaceLayersPass

    started = time.perf_counter()
    model = ir.load(str(folder / MODEL_FILE))
    replace = ReplaceLayersPass.from_plan(plan)  # low-rank splits first, then layer removal
    result = replace(model)
    counts: dict[str, Any] = {"ReplaceLayersPass": {"modified": result.modified, **_as_dict(replace.stats)}}
    _save_replacing(model, folder)
    _update_genai_config(folder / "genai_config.json", num_layers_after=_kv_layers(model))
    counts["seconds"] = round(time.perf_counter() - started, 2)
    return counts


def _as_dict(stats: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(vars(stats))


def _kv_layers(model: Any) -> int:
    return sum(1 for value in model.graph.inputs if value.name.endswith(".key") and value.name.startswith("past_"))


def _save_replacing(model: Any, folder: Path) -> None:
    """Save beside the originals, then swap: the loaded model still reads weights from the old data file."""
    import onnx_ir as ir

    tmp_model = folder / f".{MODEL_FILE}.new"
    tmp_data_name = f".{DATA_FILE}.new"
    ir.save(model, str(tmp_model), external_data=tmp_data_name)
    # The new .onnx points at the temporary data name; rewrite the locations to the final name.
    import onnx

    proto = onnx.load(str(tmp_model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = DATA_FILE
    onnx.save(proto, str(tmp_model))
    os.replace(folder / tmp_data_name, folder / DATA_FILE)
    os.replace(tmp_model, folder / MODEL_FILE)


def _update_genai_config(path: Path, num_layers_after: int) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config["model"]["decoder"]["num_hidden_layers"] = num_layers_after
    path.write_text(json.dumps(config, indent=2) + "\n")
