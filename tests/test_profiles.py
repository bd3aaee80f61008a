"""Target profiles: typed, every key checked, a misspelt key refused with its name and the file."""

from __future__ import annotations

import pytest

from edgecompress import profiles
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
