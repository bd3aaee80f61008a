"""Target profiles: typed, every key checked, a misspelt key refused with its name and the file."""

from __future__ import annotations

import pytest

from edgecompress.targets import profiles
from edgecompress.errors import EdgeCompressError

MINIMAL = 'name="mine"\ndescription="x"\ndevice="cpu"\nexecution_provider="CPUExecutionProvider"\ndtype="float32"\n'


def test_default_profile_is_cpu_x86():
    profile = profiles.load_profile(None)
    assert profile.name == "cpu-x86" and profile.device == "cpu" and profile.dtype == "float32"
    assert profile.verify.greedy_tokens == 16
    assert profile.execution_provider == ("CPUExecutionProvider",) and profile.threads == 2
    assert profile.low_bit_bounds("int4").max_mean_kl == 0.2


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(EdgeCompressError, match="valid targets: .*cpu-x86"):
        profiles.load_profile("jetson-mars")


def test_every_bundled_profile_has_the_required_keys():
    for profile in profiles.all_profiles():
        for key in profiles.REQUIRED_KEYS:
            assert getattr(profile, key)
    assert set(profiles.REQUIRED_KEYS) == {"name", "description", "device", "execution_provider", "dtype"}


def test_user_profile_file(tmp_path):
    custom = tmp_path / "mine.toml"
    custom.write_text(MINIMAL)
    profile = profiles.load_profile(str(custom))
    assert profile.name == "mine" and profile.origin == str(custom.resolve())
    assert profile.weight_formats == ("fp32",) and profile.verify == profiles.VerifyBounds()  # the defaults
    broken = tmp_path / "broken.toml"
    broken.write_text('name="x"\n')
    with pytest.raises(EdgeCompressError, match="lacks"):
        profiles.load_profile(str(broken))


@pytest.mark.parametrize("extra, message", [
    ("threadz = 2\n", "unknown key 'threadz'"),
    ("[verify]\nlogits_atoll = 1e-3\n", "unknown key 'verify.logits_atoll'"),
    ("[verify.int4]\nmax_kl = 0.1\n", "unknown key 'verify.int4.max_kl'"),
    ("threads = 0\n", "'threads' must be a positive integer"),
    ("memory_gb = \"lots\"\n", "'memory_gb' must be a positive number"),
    ("fuse = \"always\"\n", "'fuse' must be true, false or \"low-bit\""),
    ("weight_formats = []\n", "'weight_formats' must be a string or a non-empty list"),
    ('custom_ops = ["LowRankMatMul", "DenseMatMul"]\n', "'custom_ops' must be a list of LowRankMatMul, .*not DenseMatMul"),
    # the GPU fields
    ('[provider_options.CUDAExecutionProvider]\nenable_cuda_graph = 1\n',
     "'provider_options.CUDAExecutionProvider.enable_cuda_graph' must be a string"),
    ("[fp16]\nabsmax_block = 70000\n", r"'fp16.absmax_block' must be a number in \(0, 65504\]"),
    ("[fp16]\nkeep_outputs = []\n", "unknown key 'fp16.keep_outputs'"),
    ('[fp16]\nkeep_io = ["logit"]\n', "'fp16.keep_io' must be a list of float graph I/O names .*not 'logit'"),
    ("[verify.float16]\nmax_kl = 0.1\n", "unknown key 'verify.float16.max_kl'"),
    ("shared_memory = 1\n", "'shared_memory' must be true or false"),
    ("bw_efficiency = 1.5\n", r"'bw_efficiency' must be a fraction in \(0, 1\]"),
    ("max_context = 0\n", "'max_context' must be a positive integer"),
])
def test_a_malformed_profile_names_the_key_and_the_file(tmp_path, extra, message):
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL + extra)
    with pytest.raises(EdgeCompressError, match=message) as error:
        profiles.load_profile(str(path))
    assert str(path.resolve()) in str(error.value)


def test_wrong_device_and_dtype_are_refused(tmp_path):
    path = tmp_path / "tpu.toml"
    path.write_text(MINIMAL.replace('device="cpu"', 'device="tpu"'))
    with pytest.raises(EdgeCompressError, match="'device' must be one of cpu, cuda"):
        profiles.load_profile(str(path))


def test_providers_are_the_profiles_ones_present_here(tmp_path):
    path = tmp_path / "gpu-first.toml"
    path.write_text(MINIMAL.replace('execution_provider="CPUExecutionProvider"',
                                    'execution_provider=["NoSuchExecutionProvider", "CPUExecutionProvider"]'))
    assert profiles.load_profile(str(path)).providers == ["CPUExecutionProvider"]


GPU_TARGETS = ("jetson-orin-nano", "jetson-orin-nano-super", "jetson-orin-nx", "jetson-agx-orin", "a40", "rtx-4090",
               "l4", "h100")


def test_every_device_of_the_issue_has_a_profile_and_jetson_orin_is_the_nano():
    assert set(GPU_TARGETS) | {"cpu-x86"} == set(profiles.available())
    assert profiles.load_profile("jetson-orin").name == "jetson-orin-nano"
    assert profiles.aliases() == {"jetson-orin": "jetson-orin-nano"}


@pytest.mark.parametrize("name", GPU_TARGETS)
def test_gpu_profiles_carry_the_roofline_budget_and_provider_numbers(name):
    profile = profiles.load_profile(name)
    assert profile.device == "cuda" and profile.dtype == "float16" and profile.arch in ("sm_86", "sm_87", "sm_89", "sm_90")
    assert profile.memory_bandwidth_gbs > 0 and profile.peak_tflops == profile.peak_tflops_fp16 > 0
    assert 0 < profile.budget_gb < profile.memory_gb and profile.max_context and profile.sources
    assert profile.execution_provider[0] == "CUDAExecutionProvider" and profile.weights in profile.weight_formats
    # Jetson's onnxruntime builds accumulate fp16 SkipLayerNorm in half precision without it.
    assert profile.provider_options["CUDAExecutionProvider"]["enable_skip_layer_norm_strict_mode"] == "1"
    assert profile.custom_ops == ("LowRankMatMul", "MonarchMatMul", "BlastMatMul")  # our cubins cover sm_86..90
    if name.startswith("jetson"):
        assert profile.shared_memory and profile.emc_bus_bits in (128, 256) and profile.expected_power_mode
        # The bandwidth is the EMC clock's: bus bits / 8 x 2 transfers x 2133 or 3199 MHz.
        assert any(abs(profile.memory_bandwidth_gbs - mhz * 2 * profile.emc_bus_bits / 8 / 1000) < 1
                   for mhz in (2133, 3199))


def test_session_providers_pair_options_with_the_providers_present(tmp_path):
    path = tmp_path / "gpu.toml"
    path.write_text(MINIMAL.replace('execution_provider="CPUExecutionProvider"',
                                    'execution_provider=["CUDAExecutionProvider", "CPUExecutionProvider"]')
                    + '[provider_options.CUDAExecutionProvider]\nenable_skip_layer_norm_strict_mode = "1"\n'
                    + '[provider_options.CPUExecutionProvider]\narena_extend_strategy = "kSameAsRequested"\n')
    profile = profiles.load_profile(str(path))
    import onnxruntime as ort

    expected = [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        expected.insert(0, ("CUDAExecutionProvider", {"enable_skip_layer_norm_strict_mode": "1"}))
    assert profile.session_providers() == expected


def test_a_reports_copy_of_a_profile_reads_back_as_the_profile():
    for profile in profiles.all_profiles():
        copy = profiles.from_description(profile.describe(), "report")
        assert copy.describe() == {**profile.describe(), "origin": "report"}


def test_fp16_bounds_and_policy_are_read(tmp_path):
    path = tmp_path / "fp16.toml"
    path.write_text(MINIMAL.replace('dtype="float32"', 'dtype="float16"')
                    + '[fp16]\nop_block_list = ["Softmax"]\n[verify.float16]\nmax_mean_kl = 0.01\n')
    profile = profiles.load_profile(str(path))
    assert profile.fp16.op_block_list == ("Softmax",) and profile.fp16.keep_io == ("logits",)
    assert profile.verify.float16.max_mean_kl == 0.01 and profile.verify.float16.min_top1_agreement == 0.98


def test_the_cli_lists_aliases_and_sources():
    from tests.helpers import run_cli

    import os

    result = run_cli("targets", env={**os.environ, "COLUMNS": "250"})
    assert result.returncode == 0
    assert "= jetson-orin" in result.stdout and "sm_87" in result.stdout and "68 GB/s" in result.stdout
    assert "datasheet" in result.stdout and "3.8 GB" in result.stdout
