"""The activation-range scan of an fp32 graph: absmax of every intermediate float tensor.

Check 2 of fp16 validation (D.5 of docs/profiler-and-targets.md): every float tensor of the fused
fp32 model becomes a graph output of a scan copy (the model file only; it reads the same weights
file), the copy runs over a few calibration windows through onnxruntime, and the largest |x| of
each tensor is kept. A tensor that is stored fp16 on the device must stay below 65504 with
headroom for inputs the scan did not see; `edgecompress.half_precision` turns the ranges into the
converter's node block list. Torch-free: onnx, onnxruntime and numpy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgecompress import contract
from edgecompress.passes.convert_float16 import FP16_MAX  # one home: the converter pass

SCAN_FILE = "activation_scan.onnx"  # written beside the model it scans, so it reads the same data file


@dataclasses.dataclass
class ActivationScan:
    absmax: dict[str, float]  # tensor -> largest |x| over every scanned token
    producers: dict[str, tuple[str, str]]  # tensor -> (node name, op type)
    windows: int
    tokens: int
    source: str  # where the windows came from

    def hot(self, threshold: float) -> dict[str, float]:
        return {name: value for name, value in self.absmax.items() if value >= threshold}

    def table(self, top: int = 20, exclude: set[str] = frozenset()) -> list[dict[str, Any]]:
        """The largest ranges first: tensor, node, op, absmax, ratio to fp16's largest finite value."""
        rows = sorted(((k, v) for k, v in self.absmax.items() if k not in exclude), key=lambda item: -item[1])[:top]
        return [{"tensor": name, "node": self.producers.get(name, ("", ""))[0],
                 "op": self.producers.get(name, ("", ""))[1], "absmax": round(value, 3),
                 "ratio_to_fp16_max": round(value / FP16_MAX, 5)} for name, value in rows]

    def describe(self, top: int = 20, exclude: set[str] = frozenset()) -> dict[str, Any]:
        return {"source": self.source, "windows": self.windows, "tokens": self.tokens,
                "tensors": len(self.absmax), "top": self.table(top, exclude)}


def _scan_copy(model_file: Path) -> tuple[Path, dict[str, tuple[str, str]], list[str]]:
    """model_file's graph with every typed float intermediate as an output, saved beside it."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    graph = proto.graph
    float_values = {info.name for info in graph.value_info if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    existing = {output.name for output in graph.output}
    producers: dict[str, tuple[str, str]] = {}
    added = []
    for node in graph.node:
        for name in node.output:
            if name in float_values or name in existing:
                producers[name] = (node.name, node.op_type)
            if name in float_values and name not in existing:
                graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                added.append(name)
    path = model_file.with_name(SCAN_FILE)
    onnx.save(proto, str(path))
    return path, producers, added


def scan_activations(model_file: Path, windows: list[list[int]], source: str, progress: Callable | None = None,
                     **session_kwargs) -> ActivationScan:
    """absmax of every float tensor of `model_file` over `windows` (token id lists), each run as one
    prefill from an empty cache (`session_kwargs`: runtimes.session.create_session's). The scan copy
    is removed afterwards."""
    from edgecompress.runtimes.session import create_session

    step = progress or (lambda message: None)
    path, producers, _ = _scan_copy(Path(model_file))
    try:
        session = create_session(path, **session_kwargs)
        names = [output.name for output in session.get_outputs()]
        pasts = [(i.name, i.shape) for i in session.get_inputs() if contract.PAST_INPUT.match(i.name)]
        absmax = dict.fromkeys(producers, 0.0)
        tokens = 0
        for index, window in enumerate(windows):
            step(f"activation scan: window {index + 1}/{len(windows)} ({len(window)} tokens)")
            ids = np.asarray([window], np.int64)
            feed = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones_like(ids),
                    contract.POSITION_IDS: np.arange(ids.shape[1], dtype=np.int64)[None, :]}
            for name, shape in pasts:
                feed[name] = np.zeros((1, shape[1], 0, shape[3]), np.float32)
            for name, array in zip(names, session.run(names, feed)):
                if name in absmax and array.size and np.issubdtype(array.dtype, np.floating):
                    # NaN never compares larger: an fp32 NaN shows as inf so it cannot hide.
                    peak = float(np.max(np.abs(np.nan_to_num(array, nan=np.inf))))
                    absmax[name] = max(absmax[name], peak)
            tokens += ids.shape[1]
    finally:
        path.unlink(missing_ok=True)
    return ActivationScan(absmax, producers, len(windows), tokens, source)
