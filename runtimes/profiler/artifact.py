"""Opening an artifact for profiling: the manifest check, its configs, its graph, and its build target.

Everything here fails before any timing starts, with one line naming the problem (a folder that is
not an artifact, a missing or altered file, a build target that is no longer known).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecompress import contract
from edgecompress.targets import profiles
from edgecompress.errors import EdgeCompressError
from edgecompress.runtimes.artifact_files import artifact_folder, read_json, verify_manifest
from edgecompress.runtimes.decoder import KVLayout
from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.profiler.onnx_graph import Graph, read_graph


@dataclass
class Artifact:
    folder: Path
    report: dict
    manifest: dict
    genai: dict  # genai_config.json's "model"
    graph: Graph
    build_target: profiles.TargetProfile

    @property
    def vocab(self) -> int:
        return int(self.genai.get("vocab_size") or 0)

    @property
    def context_length(self) -> int | None:
        return int(self.genai.get("context_length") or 0) or None

    @property
    def heads(self) -> int:
        return int(self.genai.get("decoder", {}).get("num_attention_heads") or 0)

    def layout(self) -> KVLayout:
        """The KV cache from the graph's past inputs ([batch, kv_heads, past, head_dim]), as decoder.kv_layout
        reads it from a session: no session needed for a prediction."""
        pasts = {int(m.group(1)): value for name, value in self.graph.inputs.items()
                 if (m := contract.PAST_INPUT.match(name))}
        if not pasts or not all(isinstance(d, int) for d in (pasts[0][1][1], pasts[0][1][3])):
            raise ArtifactRuntimeError(f"'{self.folder}' has no {contract.PAST_PREFIX}* inputs with static heads")
        elem, dims = pasts[0]
        dtypes = {1: np.float32, 10: np.float16}  # ONNX TensorProto FLOAT, FLOAT16
        if elem not in dtypes:
            raise ArtifactRuntimeError(f"'{self.folder}' has a KV cache of ONNX element type {elem}; "
                                       f"the profiler runs float32 or float16 caches")
        return KVLayout(len(pasts), dims[1], dims[3], dtypes[elem])

    def describe(self, layout) -> dict:
        compression = self.report.get("compression") or {}
        params = compression.get("params", {}).get("after") or self.report.get("model", {}).get("parameters")
        return {
            "path": str(self.folder),
            "name": self.folder.name,
            "model_sha256": self.manifest.get(contract.MODEL_FILE, {}).get("sha256"),
            "built_for": self.build_target.name,
            "dtype": np.dtype(layout.dtype).name,  # of the KV cache and activations
            "weights": (self.report.get("weights") or {}).get("weights", "fp32"),
            "weights_bytes": sum(init.nbytes for init in self.graph.initializers.values()),
            "params": params,
            "layers": layout.num_layers,
            "heads": self.heads,
            "kv_heads": layout.kv_heads,
            "head_dim": layout.head_dim,
            "vocab": self.vocab,
            "context_length": self.context_length,
            "compression": {"method": compression.get("method"),
                            "ratio": compression.get("params", {}).get("achieved_ratio")} if compression else None,
        }


def open_artifact(path) -> Artifact:
    try:
        folder = artifact_folder(path)
    except ArtifactRuntimeError:
        raise ArtifactRuntimeError(f"'{path}' is not an artifact folder (no such directory)") from None
    if not (folder / contract.REPORT_FILE).is_file() or not (folder / contract.MODEL_FILE).is_file():
        raise ArtifactRuntimeError(
            f"'{folder}' is not an edgecompress artifact (no {contract.REPORT_FILE} or {contract.MODEL_FILE})"
        )
    manifest = verify_manifest(folder, hashes=True)
    report = read_json(folder, contract.REPORT_FILE)
    genai = read_json(folder, contract.GENAI_CONFIG_FILE).get("model", {})
    return Artifact(folder, report, manifest, genai, read_graph(folder / contract.MODEL_FILE), build_target(report))


def build_target(report: dict) -> profiles.TargetProfile:
    """The profile the artifact was built for: by name, else rebuilt from the report's copy of it
    (a user's .toml that is not on this machine)."""
    described = report.get("target") or {}
    name = described.get("name") or profiles.DEFAULT_TARGET
    try:
        return profiles.load_profile(name)
    except EdgeCompressError:
        pass
    try:
        return profiles.from_description(described, f"report.json's target '{name}'")
    except (EdgeCompressError, TypeError):
        raise ArtifactRuntimeError(
            f"the artifact was built for target '{name}', which is not a known profile here; pass --target"
        ) from None
