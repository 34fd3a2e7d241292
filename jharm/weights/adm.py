"""guided-diffusion / I2SB checkpoints <-> Flax ADM params (``jharm.models.adm``).

Accepted files (``.safetensors``, or ``.pt``/``.pth``/``.bin`` read with
``torch.load(weights_only=True)`` through ``jharm.weights.io``):

* a plain guided-diffusion ``UNetModel`` state dict (``input_blocks.0.0.weight``, ...);
* I2SB's network state dict, keys prefixed ``diffusion_model.`` (``Image256Net``);
* an I2SB training checkpoint ``{"net": ..., "ema": ..., "optimizer": ...}``:
  the weights are taken from ``net`` (optimizer/scheduler state is ignored), or
  with ``ema=True`` from the EMA's ``shadow_params``, which torch_ema stores as a
  list in ``net.parameters()`` order (= the state dict's order; ADM has no buffers).

``from_adm=True`` adapts the original ImageNet ADM checkpoint the way I2SB
does: the learned-sigma half of ``out.2`` is dropped when the config has
``learn_sigma=False``, and for ``cond_x1`` the x1 input channels of the first
conv are new weights, U(±1/√fan_in) as PyTorch's default conv init (``rng``).
"""
from __future__ import annotations

import re

import jax
import numpy as np

from jharm.models.adm import ADMConfig, param_shapes
from jharm.weights.convert import default_key_fn, flax_to_torch, torch_to_flax
from jharm.weights.io import WeightsError, load_state_dict, save_safetensors

_PREFIX = "diffusion_model."
_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)")
_base_key_fn = default_key_fn(("middle_block", "time_embed", "out", "in_layers", "emb_layers", "out_layers"))


def adm_key_fn(path: tuple[str, ...]) -> str:
    """Flax path -> guided-diffusion key: ``input_blocks_3_0/in_layers_2/kernel`` -> ``input_blocks.3.0.in_layers.2.weight``."""
    match = _BLOCK.fullmatch(path[0])
    head = ".".join(match.groups()) if match else path[0]
    return _base_key_fn((head,) + tuple(path[1:]))


def extract_unet_state_dict(state_dict: dict[str, np.ndarray], source: str, *, ema: bool = False) -> dict[str, np.ndarray]:
    """The bare UNet state dict from any of the accepted layouts (see module doc)."""
    if any(k.startswith("net.") for k in state_dict):
        net = {k[len("net."):]: v for k, v in state_dict.items() if k.startswith("net.")}
        if ema:
            shadows = [k for k in state_dict if k.startswith("ema.shadow_params.")]
            if len(shadows) != len(net):
                raise WeightsError(f"{source}: ema.shadow_params has {len(shadows)} tensors, net has {len(net)} entries")
            # shadow_params follow net.parameters() order, which is the state dict's order.
            net = {key: state_dict[f"ema.shadow_params.{i}"] for i, key in enumerate(net)}
        state_dict = net
    elif ema:
        raise WeightsError(f"{source}: ema=True needs an I2SB training checkpoint with 'net' and 'ema' entries")
    if any(k.startswith(_PREFIX) for k in state_dict):
        state_dict = {k[len(_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
    return state_dict


def _adapt_from_adm(state_dict, config: ADMConfig, rng, source: str):
    out_w = state_dict.get("out.2.weight")
    if out_w is not None and out_w.shape[0] == 2 * config.output_channels:
        state_dict["out.2.weight"] = out_w[: config.output_channels]  # drop the learned-sigma channels
        state_dict["out.2.bias"] = state_dict["out.2.bias"][: config.output_channels]
    in_w = state_dict.get("input_blocks.0.0.weight")
    if in_w is not None and in_w.shape[1] < config.input_channels:
        if rng is None:
            raise WeightsError(f"{source}: from_adm with cond_x1 needs rng for the new x1 input channels")
        extra = config.input_channels - in_w.shape[1]
        bound = 1.0 / np.sqrt(config.input_channels * in_w.shape[2] * in_w.shape[3])
        new = jax.random.uniform(rng, (in_w.shape[0], extra) + in_w.shape[2:], minval=-bound, maxval=bound)
        state_dict["input_blocks.0.0.weight"] = np.concatenate([in_w, np.asarray(new, in_w.dtype)], axis=1)
    return state_dict


def load_adm(path: str, config: ADMConfig, *, ema: bool = False, from_adm: bool = False,
             rng: jax.Array | None = None) -> dict:
    """Load a guided-diffusion / I2SB checkpoint into Flax params for ``config``.

    Names are mapped by :func:`adm_key_fn`; every missing/unexpected key and
    shape mismatch is reported (file, key, expected and found shape).
    """
    state_dict = extract_unet_state_dict(load_state_dict(path), path, ema=ema)
    if from_adm:
        state_dict = _adapt_from_adm(state_dict, config, rng, path)
    return torch_to_flax(state_dict, param_shapes(config), adm_key_fn, source=path)


def adm_state_dict(params, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax ADM params -> guided-diffusion state dict (``prefix="diffusion_model."`` for I2SB's net)."""
    return {prefix + k: v for k, v in flax_to_torch(params, adm_key_fn).items()}


def save_adm(params, path: str, *, prefix: str = "") -> None:
    """Write the guided-diffusion state dict as safetensors, atomically."""
    if not path.endswith(".safetensors"):
        raise WeightsError(f"{path}: ADM export writes safetensors only (name it *.safetensors)")
    save_safetensors(adm_state_dict(params, prefix=prefix), path)
