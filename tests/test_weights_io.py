"""The weight-file contract: safe formats only, clear errors naming file, key and shapes."""
import json
import os
import pickle

import jax
import numpy as np
import pytest
import torch

from jharm.weights import convert, io


def test_safetensors_round_trip_and_scalars(tmp_path):
    state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "logit_scale": np.float32(2.5).reshape(())}
    path = str(tmp_path / "m.safetensors")
    io.save_safetensors(state, path)
    loaded = io.load_state_dict(path)
    np.testing.assert_array_equal(loaded["a.weight"], state["a.weight"])
    assert loaded["logit_scale"].shape == ()


def test_truncated_and_corrupt_safetensors_are_named(tmp_path):
    path = tmp_path / "m.safetensors"
    io.save_safetensors({"w": np.ones((64, 64), np.float32)}, str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    for name in ("trunc.safetensors", "junk.safetensors"):
        with pytest.raises(io.WeightsError, match=name):
            io.load_state_dict(str(tmp_path / name))


def test_plain_bin_loads_with_weights_only(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(4.0), "nested": {"b": torch.ones(2)}, "epoch": 3}, path)
    loaded = io.load_state_dict(str(path))
    np.testing.assert_array_equal(loaded["w"], np.arange(4.0))
    np.testing.assert_array_equal(loaded["nested.b"], np.ones(2))


class _Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    # A zip-format torch checkpoint whose pickle carries a code payload.
    torch.save({"w": torch.ones(2), "evil": _Payload(str(marker))}, path, pickle_protocol=2)
    with pytest.raises(io.WeightsError, match="refused or unreadable"):
        io.load_state_dict(str(path))
    # A raw (legacy) pickle with the payload too.
    raw = tmp_path / "legacy.pt"
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(io.WeightsError, match="legacy.pt"):
        io.load_state_dict(str(raw))
    assert not marker.exists()


def test_other_formats_and_missing_files(tmp_path):
    (tmp_path / "w.pkl").write_bytes(b"x")
    with pytest.raises(io.WeightsError, match="unknown weight format"):
        io.load_state_dict(str(tmp_path / "w.pkl"))
    with pytest.raises(io.WeightsError, match="not found"):
        io.load_state_dict(str(tmp_path / "nope.safetensors"))
    with pytest.raises(io.WeightsError, match="no weight file found"):
        io.find_weights_file(str(tmp_path), ("model",))


def test_sharded_index(tmp_path):
    io.save_safetensors({"a": np.ones(2, np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    io.save_safetensors({"b": np.zeros(3, np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    path = io.find_weights_file(str(tmp_path), ("model",))
    assert path.endswith("model.safetensors.index.json")
    assert set(io.load_state_dict(path)) == {"a", "b"}
    index["weight_map"]["c"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(io.WeightsError, match=r"absent from the shards: \['c'\]"):
        io.load_state_dict(path)


def test_mapping_errors_list_missing_unexpected_and_shapes():
    template = {"down_blocks_0": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), np.float32),
                                           "bias": jax.ShapeDtypeStruct((8,), np.float32)}},
                "norm": {"scale": jax.ShapeDtypeStruct((8,), np.float32)}}
    key_fn = convert.default_key_fn({"down_blocks"})
    good = {"down_blocks.0.conv.weight": np.zeros((8, 4, 3, 3), np.float32), "down_blocks.0.conv.bias": np.zeros(8, np.float32),
            "norm.weight": np.ones(8, np.float32)}
    params = convert.torch_to_flax(dict(good), template, key_fn, source="unit.safetensors")
    assert params["down_blocks_0"]["conv"]["kernel"].shape == (3, 3, 4, 8)
    bad = dict(good, extra=np.zeros(1))
    bad["down_blocks.0.conv.weight"] = np.zeros((8, 4, 1, 1), np.float32)
    del bad["norm.weight"]
    with pytest.raises(io.WeightsError) as err:
        convert.torch_to_flax(bad, template, key_fn, source="unit.safetensors")
    text = str(err.value)
    assert "unit.safetensors" in text and "missing keys (1): norm.weight" in text
    assert "unexpected keys (1): extra" in text
    assert "down_blocks.0.conv.weight: expected (3, 3, 4, 8)" in text and "found (1, 1, 4, 8)" in text
    # Round trip back to PyTorch layout.
    back = convert.flax_to_torch(params, key_fn)
    assert back["down_blocks.0.conv.weight"].shape == (8, 4, 3, 3)
