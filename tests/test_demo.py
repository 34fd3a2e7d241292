"""`jharm demo`: the registry `make demo` reads, name errors, and the CLIP round trip."""
import importlib

from jharm import cli, demo


def test_every_demo_resolves_and_the_default_is_registered():
    assert set(demo.DEFAULT) <= set(demo.DEMOS) and "erase" in demo.DEFAULT
    for target in demo.DEMOS.values():
        module, _, fn = target.partition(":")
        assert callable(getattr(importlib.import_module(module), fn))


def test_an_unknown_demo_name_is_an_error_listing_the_choices(tmp_path, capsys):
    assert cli.main(["demo", "erasee", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown demo 'erasee'" in err and "erase" in err and "fair" in err
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_clip_round_trip_writes_its_report(tmp_path):
    (path,) = demo.run(["clip"], str(tmp_path))
    text = open(path).read()
    assert path == str(tmp_path / "clip" / "report.md") and "Max abs difference" in text
    assert (tmp_path / "clip" / "tiny_clip_hf").is_dir() and (tmp_path / "clip" / "tiny_clip_flax").is_dir()
