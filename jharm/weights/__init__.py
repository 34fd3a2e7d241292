"""Local weight files (safetensors, safe .bin) <-> Flax params. Never downloads."""
from jharm.weights.convert import count_params, default_key_fn, flax_to_torch, torch_to_flax
from jharm.weights.io import (
    WeightsError,
    atomic_write_json,
    find_weights_file,
    load_state_dict,
    read_json,
    save_safetensors,
)

__all__ = [
    "WeightsError",
    "atomic_write_json",
    "count_params",
    "default_key_fn",
    "find_weights_file",
    "flax_to_torch",
    "load_state_dict",
    "read_json",
    "save_safetensors",
    "torch_to_flax",
]
