"""Local diffusers model folders <-> Flax UNet / VAE (load and export).

A diffusers model folder holds ``config.json`` and
``diffusion_pytorch_model.safetensors`` (or a sharded index, or a ``.bin`` read
with ``weights_only=True``). Loading returns ``(module, variables, config)``
where ``variables = {"params": tree}`` is what ``module.apply`` takes; params
are float32 whatever the file's dtype. Export writes a folder that
``diffusers.<Model>.from_pretrained`` loads; it is built in a temporary
sibling folder and renamed into place, so a crash never leaves a partial model.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jharm.weights.convert import flax_to_torch, torch_to_flax
from jharm.weights.io import (
    WeightsError,
    find_weights_file,
    load_state_dict,
    read_json,
    write_model_folder,
)

WEIGHT_STEMS = ("diffusion_pytorch_model",)
IP_PARAM_NAMES = ("to_k_ip", "to_v_ip")
# Old diffusers VAE checkpoints (still on the Hub) name the attention projections
# like this; diffusers renames them on load and so do we.
_VAE_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _to_device(flat: dict) -> dict:
    # Pop as we go: only one host copy and one device copy of a leaf coexist.
    out = {}
    for path in list(flat):
        out[path] = jnp.asarray(flat.pop(path))
    return traverse_util.unflatten_dict(out)


def _convert(state_dict, module, init_fn, key_fn, source: str):
    template = jax.eval_shape(init_fn, jax.random.key(0))["params"]
    flat = traverse_util.flatten_dict(torch_to_flax(state_dict, template, key_fn, source=source))
    return {"params": _to_device(flat)}  # the flat dict holds the only references: freed leaf by leaf


def load_unet(folder: str, **overrides):
    """Load a diffusers ``UNet2DConditionModel`` folder -> ``(module, variables, config)``.

    ``overrides`` set jharm-only config fields: ``dtype`` (compute dtype),
    ``remat``. To add IP-Adapter params, load them with
    :func:`jharm.models.ip_adapter.load_ip_adapter` and ``merge`` them.
    """
    from jharm.models.unet import KEY_FN, UNet2DConditionModel, UNetConfig

    if overrides.get("ip_adapter_tokens"):
        raise ValueError("load_unet loads a plain SD UNet; add IP-Adapter params with IPAdapter.merge")
    config_path = os.path.join(folder, "config.json")
    try:
        config = UNetConfig.from_diffusers_config(read_json(config_path), **overrides)
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{config_path}: {err}") from None
    module = UNet2DConditionModel(config)
    path = find_weights_file(folder, WEIGHT_STEMS)
    variables = _convert(load_state_dict(path), module, lambda rng: module.init_params(rng, context_len=1),
                         KEY_FN, path)
    return module, variables, config


def _rename_legacy_vae_keys(state_dict: dict) -> dict:
    for key in [k for k in state_dict if ".attentions." in k]:
        prefix, name, leaf = key.rsplit(".", 2)
        if name in _VAE_LEGACY_ATTENTION:
            value = state_dict.pop(key)
            if value.ndim == 4:  # 1x1-conv form of a linear weight
                value = value[:, :, 0, 0]
            state_dict[f"{prefix}.{_VAE_LEGACY_ATTENTION[name]}.{leaf}"] = value
    return state_dict


def load_vae(folder: str, **overrides):
    """Load a diffusers ``AutoencoderKL`` folder -> ``(module, variables, config)``.

    Accepts the legacy attention names (``query``/``key``/``value``/``proj_attn``).
    """
    from jharm.models.vae import KEY_FN, AutoencoderKL, VAEConfig

    config_path = os.path.join(folder, "config.json")
    try:
        config = VAEConfig.from_diffusers_config(read_json(config_path), **overrides)
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{config_path}: {err}") from None
    module = AutoencoderKL(config)
    path = find_weights_file(folder, WEIGHT_STEMS)
    size = 2 ** (len(config.block_out_channels) - 1)
    init_fn = lambda rng: module.init(rng, jnp.zeros((1, size, size, config.in_channels)))  # noqa: E731
    variables = _convert(_rename_legacy_vae_keys(load_state_dict(path)), module, init_fn, KEY_FN, path)
    return module, variables, config


def strip_ip_params(params):
    """Drop every IP-Adapter ``to_k_ip``/``to_v_ip`` leaf (a plain SD UNet tree remains)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if not set(p) & set(IP_PARAM_NAMES)})


def _params_tree(variables):
    return variables["params"] if "params" in variables else variables


def _export_folder(out_dir: str, config_dict: dict, state_dict: dict) -> str:
    return write_model_folder(out_dir, config_dict, state_dict, WEIGHT_STEMS[0] + ".safetensors")


def _float32_state_dict(params, key_fn) -> dict:
    return {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) or
            np.asarray(v).dtype.name == "bfloat16" else v for k, v in flax_to_torch(params, key_fn).items()}


def export_unet(config, params, out_dir: str) -> str:
    """Write ``params`` (variables or bare param tree) as a diffusers UNet folder.

    IP-Adapter params are dropped: the exported model is a plain SD UNet.
    Returns the folder's absolute path.
    """
    from jharm.models.unet import KEY_FN

    state = _float32_state_dict(strip_ip_params(_params_tree(params)), KEY_FN)
    return _export_folder(out_dir, config.to_diffusers_config(), state)


def export_vae(config, params, out_dir: str) -> str:
    """Write ``params`` as a diffusers AutoencoderKL folder; returns its path."""
    from jharm.models.vae import KEY_FN

    return _export_folder(out_dir, config.to_diffusers_config(), _float32_state_dict(_params_tree(params), KEY_FN))


def read_flax_params(path: str) -> dict:
    """A Flax param tree from ``path``: the train loop's ``params.safetensors``
    (``a/b/c`` keys) or a ``flax.serialization`` ``.msgpack`` file. A leading
    ``params`` level (a variables dict) is removed."""
    if path.endswith(".msgpack"):
        from flax import serialization

        if not os.path.isfile(path):
            raise WeightsError(f"params file not found: {path}")
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    else:
        tree = traverse_util.unflatten_dict(load_state_dict(path), sep="/")
    return tree["params"] if set(tree) == {"params"} else tree


def check_params(params, template, source: str) -> None:
    """Raise WeightsError naming every missing/unexpected path and shape mismatch."""
    have = traverse_util.flatten_dict(params, sep="/")
    want = traverse_util.flatten_dict(template, sep="/")
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: expected {tuple(want[k].shape)}, found {tuple(np.shape(have[k]))}"
                 for k in sorted(set(want) & set(have)) if tuple(want[k].shape) != tuple(np.shape(have[k]))]
    if problems:
        raise WeightsError(f"{source}: params do not fit the model config ({len(problems)} problems): "
                           + "; ".join(problems[:20]))


EXPORT_KINDS = ("unet", "vae", "clip_text")


def export_params_file(kind: str, params_path: str, base: str, out_dir: str) -> str:
    """Export a Flax params file as a diffusers/transformers folder (``jharm export``).

    ``base`` is the model folder the params were converted from (its
    ``config.json`` fixes the architecture); the params are shape-checked
    against it first. ``kind``: ``unet`` (IP-Adapter params dropped), ``vae``
    or ``clip_text``. Returns the written folder.
    """
    params = read_flax_params(params_path)
    raw = read_json(os.path.join(base, "config.json"))
    if kind == "unet":
        from jharm.models.unet import UNet2DConditionModel, UNetConfig

        config = UNetConfig.from_diffusers_config(raw)
        params = strip_ip_params(params)
        module = UNet2DConditionModel(config)
        template = jax.eval_shape(lambda r: module.init_params(r, context_len=1), jax.random.key(0))["params"]
        check_params(params, template, params_path)
        return export_unet(config, params, out_dir)
    if kind == "vae":
        from jharm.models.vae import AutoencoderKL, VAEConfig

        config = VAEConfig.from_diffusers_config(raw)
        module = AutoencoderKL(config)
        size = 2 ** (len(config.block_out_channels) - 1)
        template = jax.eval_shape(lambda r: module.init(r, jnp.zeros((1, size, size, config.in_channels))),
                                  jax.random.key(0))["params"]
        check_params(params, template, params_path)
        return export_vae(config, params, out_dir)
    if kind == "clip_text":
        from jharm.models.clip import CLIPTextConfig, CLIPTextModel
        from jharm.weights.clip import export_clip_text_model

        config = CLIPTextConfig.from_hf(raw, with_projection="text_projection" in params)
        check_params(params, jax.eval_shape(CLIPTextModel(config).init_params, jax.random.key(0)), params_path)
        return export_clip_text_model(config, params, out_dir)
    raise ValueError(f"unknown export kind {kind!r} (choose from {', '.join(EXPORT_KINDS)})")
