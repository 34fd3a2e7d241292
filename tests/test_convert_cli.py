"""`jharm convert`: a local folder -> Flax params checkpoint, equal to the loader's params."""
import json

import numpy as np
import transformers
from flax import traverse_util

from jharm import cli
from jharm.weights import clip as clip_weights
from jharm.weights.diffusers import read_flax_params

TEXT = dict(vocab_size=500, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            projection_dim=8)


def test_convert_clip_text(tmp_path, capsys):
    transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)).save_pretrained(tmp_path / "src")
    rc = cli.main(["convert", "--kind", "clip_text", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    _, params, _ = clip_weights.load_clip_text_model(str(tmp_path / "src"))
    expected = traverse_util.flatten_dict(params, sep="/")
    got = traverse_util.flatten_dict(read_flax_params(str(tmp_path / "out" / "params.safetensors")), sep="/")
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], np.asarray(expected[key]))
    manifest = json.loads((tmp_path / "out" / "jharm.json").read_text())
    assert manifest["kind"] == "clip_text" and f"{manifest['num_params']:,} params" in out


def test_convert_errors(tmp_path, capsys):
    assert cli.main(["convert", "--kind", "clip_text", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err
    assert cli.main(["convert", "--kind", "bogus", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "unknown kind" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
