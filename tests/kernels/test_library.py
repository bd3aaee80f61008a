"""kernels/library.py: finding, checking, registering and building libedgecompress_ops.so, and what the
library is made of (no libcuda, no libonnxruntime), each failure a one-line KernelLibraryError."""

from __future__ import annotations

import ctypes
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgecompress.errors import EdgeCompressError
from edgecompress.kernels import (
    KernelLibraryError,
    build_library,
    library,
    library_info,
    library_path,
    manifest,
    register,
)
from edgecompress.kernels import reference
from tests.kernels.ops_library import built_library, one_op_model

REPO = Path(__file__).resolve().parents[2]


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and isinstance(exc, EdgeCompressError)
    return message


def test_library_links_neither_libcuda_nor_libonnxruntime_and_exports_only_its_entry_points():
    path = built_library()
    dynamic = subprocess.run(
        ["readelf", "-d", "--dyn-syms", str(path)], capture_output=True, text=True, check=True
    ).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed and not [n for n in needed if "cuda" in n or "onnxruntime" in n], needed
    exported = {line.split()[-1] for line in dynamic.splitlines() if " GLOBAL " in line and " UND " not in line}
    assert {"RegisterCustomOps", "ec_library_info"} <= exported
    assert not [name for name in exported if name.startswith("_ZN3Ort")]  # inline Ort:: wrappers stay hidden


def test_library_loads_and_runs_cpu_ops_without_a_cuda_driver(tmp_path):
    """A fresh process with no libcuda to find (EC_LIBCUDA points nowhere): registering and running work."""
    script = (
        "import numpy as np, onnxruntime as ort\n"
        "import sys\n"
        "from edgecompress.kernels import register\n"
        "so = ort.SessionOptions(); register(so)\n"
        "s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])\n"
        "x, a, b = np.ones((2, 4), np.float32), np.ones((4, 3), np.float32), np.ones((3, 5), np.float32)\n"
        "print(float(s.run(None, {'i0': x, 'i1': a, 'i2': b})[0].sum()))\n"
    )
    env = {
        **os.environ,
        "EC_LIBCUDA": str(tmp_path / "no-libcuda.so.1"),
        "LD_LIBRARY_PATH": "",
        library.ENV_LIBRARY: str(built_library()),
    }
    model = tmp_path / "low_rank.onnx"  # written here: the child imports nothing from tests/
    model.write_bytes(one_op_model("LowRankMatMul", [np.float32] * 3))
    result = subprocess.run([sys.executable, "-P", "-c", script, str(model)], capture_output=True, text=True, env=env,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(2 * 5 * 4 * 3.0)


def test_info_names_the_domain_ops_and_the_headers_api():
    info = library_info(built_library())
    assert info["domain"] == reference.DOMAIN and info["domain_version"] == reference.DOMAIN_VERSION
    assert tuple(info["ops"]) == reference.OPS
    assert info["version"] == library.expected_version() and info["ort_api_version"] == 21
    assert info["cpu_dtypes"] == ["float32", "float16"]


def test_manifest_joins_the_library_info_and_the_cubin_manifest_next_to_it(tmp_path):
    lib = shutil.copy(built_library(), tmp_path / library.LIBRARY_NAME)
    assert manifest(lib)["cubins"] is None and manifest(lib)["library"]["domain"] == reference.DOMAIN
    (tmp_path / "manifest.json").write_text(json.dumps({"entries": [{"sm": 87, "dtype": "fp16"}]}))
    assert manifest(lib)["cubins"]["entries"] == [{"sm": 87, "dtype": "fp16"}]
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(KernelLibraryError) as caught:
        manifest(lib)
    assert "manifest.json" in one_line(caught.value) and "make kernels" in str(caught.value)


def test_library_path_prefers_the_environment_and_says_what_to_run_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(library.ENV_LIBRARY, str(built_library()))
    assert library_path() == built_library()
    monkeypatch.setenv(library.ENV_LIBRARY, str(tmp_path / "gone.so"))
    with pytest.raises(KernelLibraryError) as caught:
        library_path()
    assert str(tmp_path / "gone.so") in one_line(caught.value) and "make kernels" in str(caught.value)
    monkeypatch.delenv(library.ENV_LIBRARY)
    monkeypatch.setattr(library, "BUILD", tmp_path)
    with pytest.raises(KernelLibraryError) as caught:
        library_path()
    assert str(tmp_path / library.LIBRARY_NAME) in one_line(caught.value) and "make kernels" in str(caught.value)


def test_unloadable_foreign_and_stale_libraries_are_one_line_errors(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"not an ELF file")
    with pytest.raises(KernelLibraryError, match="cannot load the custom-op library .*garbage.so") as caught:
        library_info(garbage)
    one_line(caught.value)
    foreign = tmp_path / "libforeign.so"
    subprocess.run(
        ["g++", "-shared", "-fPIC", "-x", "c++", "-", "-o", str(foreign)],
        input="int f() { return 1; }",
        text=True,
        check=True,
    )
    with pytest.raises(KernelLibraryError, match="not an edgecompress ops library") as caught:
        register(ort.SessionOptions(), foreign)
    one_line(caught.value)
    monkeypatch.setattr(library, "expected_version", lambda: 99)
    with pytest.raises(
        KernelLibraryError, match=r"is version 1, this edgecompress needs version 99; run `make kernels`"
    ):
        library_info(built_library())


def test_an_onnxruntime_older_than_the_headers_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.20.1")
    with pytest.raises(
        KernelLibraryError, match=r"needs onnxruntime >= 1\.21 \(C API 21\); this onnxruntime is 1\.20\.1"
    ) as caught:
        register(ort.SessionOptions(), built_library())
    one_line(caught.value)


def test_registering_into_two_session_options_gives_two_working_sessions():
    x, a, b = (np.full(shape, 0.5, np.float32) for shape in ((3, 4), (4, 2), (2, 6)))
    outputs = []
    for _ in range(2):
        options = ort.SessionOptions()
        assert register(options, built_library()) == built_library()
        s = ort.InferenceSession(
            one_op_model("LowRankMatMul", [np.float32] * 3), options, providers=["CPUExecutionProvider"]
        )
        outputs.append(s.run(None, {"i0": x, "i1": a, "i2": b})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_allclose(outputs[0], reference.low_rank_matmul(x, a, b), rtol=1e-6)


def test_build_is_reused_when_up_to_date_and_a_failed_build_leaves_nothing(tmp_path):
    # build_library itself, not the cached built_library(): cubins generated by an earlier test since that
    # first build (a run without `make kernels`) make the library stale once, rightly.
    path = build_library()
    before = path.stat().st_mtime_ns
    assert build_library() == path and path.stat().st_mtime_ns == before
    bad = tmp_path / "bad.cc"
    bad.write_text("int broken( {\n")
    out = tmp_path / "out"
    with pytest.raises(
        KernelLibraryError, match=r"building libedgecompress_ops.so failed: .*bad.cc:1.*error"
    ) as caught:
        build_library(out, sources=[bad])
    one_line(caught.value)
    assert not (out / library.LIBRARY_NAME).exists() and not list(out.glob("*.tmp"))


def test_register_custom_ops_refuses_a_runtime_without_the_headers_api_and_names_both_versions():
    """RegisterCustomOps itself, called through ctypes with the wheel's real OrtApiBase wrapped so that it
    does not serve API 21 (as an onnxruntime older than 1.21 would not): a status, not a crash."""
    capi = Path(ort.__file__).parent / "capi"
    runtime = ctypes.CDLL(sorted(glob.glob(str(capi / "libonnxruntime.so.1*")))[0])
    get_api_type = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
    version_type = ctypes.CFUNCTYPE(ctypes.c_char_p)

    class ApiBase(ctypes.Structure):
        _fields_ = [("GetApi", get_api_type), ("GetVersionString", version_type)]

    runtime.OrtGetApiBase.restype = ctypes.POINTER(ApiBase)
    real = runtime.OrtGetApiBase().contents
    fake = ApiBase(get_api_type(lambda version: None if version == 21 else real.GetApi(version)), real.GetVersionString)
    ops = ctypes.CDLL(str(built_library()))
    ops.RegisterCustomOps.restype = ctypes.c_void_p
    status = ops.RegisterCustomOps(None, ctypes.byref(fake))
    assert status
    api = ctypes.cast(
        real.GetApi(1), ctypes.POINTER(ctypes.c_void_p)
    )  # OrtApi: CreateStatus, GetErrorCode, GetErrorMessage
    message = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(api[2])(status).decode()
    assert message == (
        f"libedgecompress_ops: built with the onnxruntime C API 21 headers (onnxruntime >= 1.21), but this "
        f"onnxruntime is {ort.__version__}; upgrade onnxruntime or rebuild (make kernels)"
    )
