from __future__ import annotations

import pytest

from edgecompress import profiles
from edgecompress.errors import EdgeCompressError


def test_default_profile_is_cpu_x86():
    profile = profiles.load_profile(None)
    assert profile["name"] == "cpu-x86" and profile["device"] == "cpu" and profile["dtype"] == "float32"
    assert profile["verify"]["greedy_tokens"] == 16


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(EdgeCompressError, match="valid targets: .*cpu-x86"):
        profiles.load_profile("jetson-mars")


def test_every_bundled_profile_has_the_required_keys():
    for profile in profiles.all_profiles():
        for key in profiles.REQUIRED_KEYS:
            assert key in profile


def test_user_profile_file(tmp_path):
    custom = tmp_path / "mine.toml"
    custom.write_text('name="mine"\ndescription="x"\ndevice="cpu"\nexecution_provider="CPUExecutionProvider"\ndtype="float32"\n')
    assert profiles.load_profile(str(custom))["name"] == "mine"
    broken = tmp_path / "broken.toml"
    broken.write_text('name="x"\n')
    with pytest.raises(EdgeCompressError, match="lacks"):
        profiles.load_profile(str(broken))
