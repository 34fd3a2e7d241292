"""IP-Adapter (SD 1.5 format): image projection + decoupled cross-attention params.

An image embedding (B, E) becomes N context tokens through ``ImageProjModel``
(Linear E -> N·D, reshape, LayerNorm); every attn2 of the UNet gets bias-free
``to_k_ip``/``to_v_ip`` (D -> inner) and adds s·softmax(QK'ᵀ/√d)V' to its output
(see ``jharm.models.layers.Attention``).

The official checkpoint layout (``ip-adapter_sd15.bin``/``.safetensors``):
``image_proj.proj.{weight,bias}``, ``image_proj.norm.{weight,bias}`` and
``ip_adapter.{2k+1}.to_{k,v}_ip.weight`` for the k-th attn2 in diffusers'
``attn_processors`` order (down blocks, up blocks, mid block; the even numbers
were the self-attention processors, which carry no weights).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jharm.models.layers import layer_norm
from jharm.models.unet import UNet2DConditionModel, UNetConfig, ip_layer_paths
from jharm.weights.convert import default_key_fn, flax_to_torch, torch_to_flax
from jharm.weights.io import WeightsError, load_state_dict, save_safetensors

KEY_FN = default_key_fn()
IP_PROJECTIONS = ("to_k_ip", "to_v_ip")


class ImageProjModel(nn.Module):
    """(B, E) image embeddings -> (B, num_tokens, cross_attention_dim) context tokens."""

    cross_attention_dim: int
    num_tokens: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image_embeds):
        x = nn.Dense(self.num_tokens * self.cross_attention_dim, dtype=self.dtype, name="proj")(image_embeds)
        x = x.reshape(x.shape[0], self.num_tokens, self.cross_attention_dim)
        return layer_norm(1e-5, self.dtype, "norm")(x)


def _checkpoint_index(k: int) -> str:
    return str(2 * k + 1)


def _ip_layer_template(config: UNetConfig) -> dict:
    """{attn2 path: {to_k_ip: {kernel: shape}, to_v_ip: ...}} for ``config``."""
    module = UNet2DConditionModel(dataclasses.replace(config, ip_adapter_tokens=max(config.ip_adapter_tokens, 1)))
    flat = traverse_util.flatten_dict(jax.eval_shape(lambda r: module.init_params(r, context_len=1),
                                                     jax.random.key(0))["params"])
    out = {}
    for path in ip_layer_paths(config):
        prefix = tuple(path.split("/"))
        out[path] = {proj: {"kernel": flat[prefix + (proj, "kernel")]} for proj in IP_PROJECTIONS}
    return out


@dataclasses.dataclass
class IPAdapter:
    """A loaded IP-Adapter: the image projection and every attn2's ip params.

    ``layers`` maps attn2 paths (``ip_layer_paths`` order) to
    ``{"to_k_ip": {"kernel": ...}, "to_v_ip": {"kernel": ...}}``.
    """

    image_proj: ImageProjModel
    image_proj_params: dict
    layers: dict

    @property
    def num_tokens(self) -> int:
        return self.image_proj.num_tokens

    @classmethod
    def load(cls, path: str, unet_config: UNetConfig) -> "IPAdapter":
        """Read an official-layout checkpoint (.safetensors, or .bin with weights_only)."""
        state = load_state_dict(path)
        proj = state.get("image_proj.proj.weight")
        if proj is None:
            raise WeightsError(f"{path}: not an IP-Adapter (SD 1.5 layout) checkpoint: no key image_proj.proj.weight "
                               f"(found e.g. {sorted(state)[:5]})")
        d = unet_config.cross_attention_dim
        if proj.ndim != 2 or proj.shape[0] % d:
            raise WeightsError(f"{path}: image_proj.proj.weight: expected (N*{d}, E) for the UNet's "
                               f"cross_attention_dim {d}, found {tuple(proj.shape)}")
        image_proj = ImageProjModel(d, proj.shape[0] // d)
        proj_template = jax.eval_shape(image_proj.init, jax.random.key(0), jnp.zeros((1, proj.shape[1])))["params"]
        layer_template = _ip_layer_template(unet_config)
        template = {"image_proj": proj_template,
                    "ip_adapter": {_checkpoint_index(k): v for k, v in enumerate(layer_template.values())}}
        tree = torch_to_flax(state, template, KEY_FN, source=path)
        layers = {p: tree["ip_adapter"][_checkpoint_index(k)] for k, p in enumerate(layer_template)}
        return cls(image_proj, {"params": tree["image_proj"]}, layers)

    @classmethod
    def from_unet(cls, unet_config: UNetConfig, unet_params, image_proj: ImageProjModel,
                  image_proj_params) -> "IPAdapter":
        """Collect (e.g. trained) ip params from an IP-enabled UNet's params."""
        params = unet_params.get("params", unet_params)
        layers = {}
        for path in ip_layer_paths(unet_config):
            node = params
            for part in path.split("/"):
                node = node[part]
            layers[path] = {proj: {"kernel": node[proj]["kernel"]} for proj in IP_PROJECTIONS}
        return cls(image_proj, image_proj_params, layers)

    def image_tokens(self, image_embeds):
        """(B, E) CLIP image embeddings -> (B, N, D) tokens for ``ip_tokens``."""
        return self.image_proj.apply(self.image_proj_params, image_embeds)

    def merge(self, unet_config: UNetConfig, unet_params):
        """Return ``(config, variables)`` of the UNet with this adapter's ip params added."""
        params = unet_params.get("params", unet_params)
        flat = dict(traverse_util.flatten_dict(params))
        if set(ip_layer_paths(unet_config)) != set(self.layers):
            raise WeightsError(f"IP-Adapter has {len(self.layers)} attn2 layers, the UNet has "
                               f"{len(ip_layer_paths(unet_config))}")
        for path, projs in self.layers.items():
            for proj, leaf in projs.items():
                flat[tuple(path.split("/")) + (proj, "kernel")] = leaf["kernel"]
        config = dataclasses.replace(unet_config, ip_adapter_tokens=self.num_tokens)
        return config, {"params": traverse_util.unflatten_dict(flat)}

    def state_dict(self) -> dict:
        """The official flat layout (``image_proj.*``, ``ip_adapter.{2k+1}.to_{k,v}_ip.weight``)."""
        tree = {"image_proj": self.image_proj_params["params"],
                "ip_adapter": {_checkpoint_index(k): v for k, v in enumerate(self.layers.values())}}
        return flax_to_torch(tree, KEY_FN)

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` as one safetensors file (atomic)."""
        save_safetensors(self.state_dict(), path)


def load_ip_adapter(path: str, unet_config: UNetConfig) -> IPAdapter:
    """``IPAdapter.load``: an official SD 1.5 IP-Adapter file for a UNet of ``unet_config``."""
    return IPAdapter.load(path, unet_config)
