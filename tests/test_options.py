"""Each build option is declared once (a field of options.BuildOptions / CompressOptions with its default, help and
flags); the CLI's `build` and `edgecompress.build` are generated from those fields."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import typer.main

import edgecompress
from edgecompress import cli, options
from edgecompress.options import BuildOptions, CompressOptions, build_option_fields, build_options


def _command(name: str):
    return next(c for c in typer.main.get_command(cli.app).commands.values() if c.name == name)


def test_the_cli_takes_every_option_field_once_with_its_flags_default_and_help():
    params = {p.name: p for p in _command("build").params}
    declared = [entry for entry in build_option_fields() if entry.metadata["cli"]]
    assert set(params) == {entry.name for entry in declared} | {"verbose", "quiet"}
    for entry in declared:
        param, meta = params[entry.name], entry.metadata
        assert param.default == entry.default, entry.name
        text = meta["help"]() if callable(meta["help"]) else meta["help"]
        assert param.help == text
        for flag in meta["flags"]:
            assert any(flag.split("/")[0] == opt for opt in param.opts + param.secondary_opts), (entry.name, flag)
    assert params["model"].param_type_name == "argument"
    hidden = {entry.name for entry in build_option_fields() if not entry.metadata["cli"]}
    assert hidden == {"rounding"}  # a field kept off the command line, still taken by the API


def test_the_api_signature_is_the_fields():
    signature = inspect.signature(edgecompress.build)
    names = [name for name in signature.parameters if name != "progress"]
    assert names == [entry.name for entry in build_option_fields()]
    assert [p.kind for p in list(signature.parameters.values())[:3]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3
    for entry in build_option_fields():
        assert signature.parameters[entry.name].default == entry.default
    with pytest.raises(TypeError, match="calib_seqs"):
        edgecompress.build("m", calib_seqs=4)


def test_flat_options_split_into_build_and_compress():
    chosen = build_options(model="m", out="o", ratio=0.2, calibration=Path("c.txt"), eval_data=Path("e.txt"),
                           calib_sequences=8, weights="int4")
    assert isinstance(chosen.compress, CompressOptions) and chosen.auto_compress is None
    assert chosen.compress.ratio == 0.2 and chosen.compress.calib_sequences == 8 and chosen.compress.calibration == "c.txt"
    assert chosen.out == Path("o") and chosen.eval_data == "e.txt" and chosen.weights == "int4"
    fallback = build_options(model="m", calib_sequences=8)  # no ratio: the memory budget's settings
    assert fallback.compress is None and fallback.auto_compress.calib_sequences == 8
    assert build_options(plan="p").compress.plan == Path("p")


def test_no_build_default_is_written_twice():
    """The CLI's and the API's build name no option and no default of their own: options.py holds them (the API
    names its three positional ones, None until options.build_options reads them)."""
    for path, named in ((Path(cli.__file__), ()), (Path(edgecompress.api.__file__), ("model", "target", "out"))):
        body = path.read_text().split("\ndef build(")[1].split("\ndef ")[0]
        for entry in build_option_fields():
            if entry.name in named:
                continue
            assert not re.search(rf"\b{entry.name}\s*(:[^=\n]*)?=", body), (path, entry.name)
        assert "DEFAULT" not in body and "typer.Option" not in body


def test_every_field_has_help():
    for cls in (BuildOptions, CompressOptions):
        for entry in cls.__dataclass_fields__.values():
            assert entry.metadata.get("help"), (cls.__name__, entry.name)
    assert options.option(None, "x").metadata["show_default"] is False
