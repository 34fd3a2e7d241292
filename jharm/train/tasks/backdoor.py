"""I2SB and MixBridge as train-loop tasks (METHODS.md §3), registered as ``i2sb`` and ``mixbridge``.

``i2sb``: one ADM bridge network on clean (x0, x1 = corrupt(x0)) pairs, from
ShapesWorld renders or a user image folder. The I2SB loss: n ~ U{0..N-1},
x_n = q_sample(x0, x1, ξ), MSE(net(x_n, noise_levels[n][, x1]), (x_n − x0)/σ_fwd(n)).

``mixbridge`` (``config.task.phase``):

* ``divide`` — M+1 experts, stacked on a leading axis and run together
  (``jharm.models.mixbridge.map_experts``): expert 0 trains on clean pairs,
  expert i on 100 % poisoned pairs of backdoor task i (trigger i stamped on x1,
  x0 replaced by the nearest image of target pool i). Each expert reads its own
  slice of the batch; the loss is the sum of the experts' losses, so expert i's
  gradient is that of its own task.
* ``router`` — the router alone, trained as a classifier of
  {clean, trigger 1..M} on x1 (the official code pre-trains it so).
* ``merge`` — experts (from a ``divide`` export) and router (from a ``router``
  export, or fresh) trained jointly on a mixture batch (each sample clean or
  task i, with probability 1/(M+1) unless ``backdoor.rates`` says otherwise):
  bridge MSE of Σ_i w_i(x1)·net_i + ``wrs_weight``·L_WRS (0 = "w/o WRS").
* ``single`` — the baseline: one ADM trained on the same mixture batches.

All data randomness (images, corruption masks, task draws) comes from
``make_batch(step)``; the bridge step n and the noise ξ are drawn on device from
the loop's per-step key. Both are functions of (seed, step), so a resumed run
is exact. Exports are one safetensors file, ``<workdir>/bridge.safetensors``,
with the model description in its metadata (:func:`load_bridge_model`); the
``i2sb``/``single`` weights carry guided-diffusion names (``jharm.weights.adm``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jharm.config import ConfigError
from jharm.diffusion import bridge, corruptions, poison
from jharm.models.adm import ADMConfig, adm_apply_fn, init_adm
from jharm.models.mixbridge import EXPERT_MODES, Router, RouterConfig, map_experts, stack_expert_params
from jharm.objectives.backdoor import (bridge_mse, mixbridge_loss, mixture_prediction, per_task_losses,
                                      routing_entropy_bits, weight_reallocation_loss)
from jharm.shapesworld.data import batch_rng
from jharm.train import sharding
from jharm.train.task import Task

PyTree = Any
PHASES = ("divide", "router", "merge", "single")
SOURCES = ("shapesworld", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
EXPORT_NAME = "bridge.safetensors"
_META_KEY = "jharm_bridge"
# ADMConfig fields a config may set under task.adm (image_size comes from task.data).
ADM_FIELDS = ("model_channels", "num_res_blocks", "attention_resolutions", "dropout", "channel_mult",
              "conv_resample", "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
              "resblock_updown", "use_new_attention_order", "cond_x1", "use_checkpoint", "norm_groups")
# ShapesWorld backdoor targets: "shape/colour/background" (render names).
SHAPESWORLD_TARGETS = ("star/yellow/dark", "heart/blue/light", "cross/green/gradient")


# --- config ---------------------------------------------------------------------


def default_task_config(name: str = "i2sb", phase: str = "merge") -> ml_collections.ConfigDict:
    """``config.task`` for ``i2sb`` / ``mixbridge`` with the ShapesWorld (CPU-sized) defaults.

    Every field is described in docs/backdoor.md.
    """
    from jharm.shapesworld.world import world_config

    c = ml_collections.ConfigDict()
    c.name = name
    c.phase = phase
    c.data = dict(source="shapesworld", folder="", eval_folder="", image_size=32, corruption="sr4x-pool",
                  data_seed=0)
    c.world = world_config()
    c.adm = dict(model_channels=16, num_res_blocks=1, attention_resolutions=(), dropout=0.0, channel_mult=(1, 2, 2),
                 conv_resample=True, num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False, cond_x1=True,
                 use_checkpoint=False, norm_groups=8)
    c.bridge = dict(interval=1000, beta_max=0.3, ot_ode=False)
    c.sample = dict(nfe=10, clip_denoise=True)
    c.backdoor = dict(num_tasks=3, trigger_size=6, trigger_value=0.0, targets=SHAPESWORLD_TARGETS, target_dirs=(),
                      target_pool=1, rates=())
    c.router = dict(widths=(16, 32, 64), blocks_per_stage=1, norm_groups=8, pool="max")
    c.wrs_weight = 1.0
    c.experts_mode = "vmap"
    c.init_path = ""
    c.init_from_adm = False
    c.experts_path = ""
    c.router_path = ""
    return c


def adm_config(tc) -> ADMConfig:
    extra = set(tc.adm.keys()) - set(ADM_FIELDS)
    if extra:
        raise ConfigError(f"config.task.adm: unknown keys {sorted(extra)}; known: {ADM_FIELDS}")
    kwargs = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in tc.adm.items()}
    try:
        return ADMConfig(image_size=int(tc.data.image_size), **kwargs)
    except ValueError as err:
        raise ConfigError(f"config.task.adm: {err}") from None


def router_config(tc, num_experts: int) -> RouterConfig:
    try:
        return RouterConfig(num_experts=num_experts, widths=tuple(tc.router.widths),
                            blocks_per_stage=int(tc.router.blocks_per_stage), norm_groups=int(tc.router.norm_groups),
                            pool=tc.router.pool)
    except ValueError as err:
        raise ConfigError(f"config.task.router: {err}") from None


def schedule_of(tc) -> bridge.BridgeSchedule:
    return bridge.make_bridge_schedule(int(tc.bridge.interval), float(tc.bridge.beta_max),
                                       ot_ode=bool(tc.bridge.ot_ode))


def task_rates(tc) -> np.ndarray:
    """Per-backdoor-task probabilities of a mixture batch (default 1/(M+1) each)."""
    m = int(tc.backdoor.num_tasks)
    rates = tuple(tc.backdoor.rates)
    if not rates:
        return np.full(m, 1.0 / (m + 1))
    if len(rates) != m:
        raise ConfigError(f"config.task.backdoor.rates: {len(rates)} rates for num_tasks={m}")
    try:
        return poison._check_rates(rates)
    except ValueError as err:
        raise ConfigError(f"config.task.backdoor.rates: {err}") from None


def _check(tc) -> None:
    if tc.name == "mixbridge" and tc.phase not in PHASES:
        raise ConfigError(f"config.task.phase: {tc.phase!r} is not one of {PHASES}")
    if tc.data.source not in SOURCES:
        raise ConfigError(f"config.task.data.source: {tc.data.source!r} is not one of {SOURCES}")
    try:
        corruptions.check_name(tc.data.corruption)
    except ValueError as err:
        raise ConfigError(f"config.task.data.corruption: {err}") from None
    if tc.experts_mode not in EXPERT_MODES:
        raise ConfigError(f"config.task.experts_mode: {tc.experts_mode!r} is not one of {EXPERT_MODES}")
    m = int(tc.backdoor.num_tasks)
    if tc.name == "mixbridge" and m < 1:
        raise ConfigError(f"config.task.backdoor.num_tasks: MixBridge needs >= 1 backdoor task, found {m}")
    if m > len(poison.CORNERS):
        raise ConfigError(f"config.task.backdoor.num_tasks: corner triggers support at most "
                          f"{len(poison.CORNERS)} tasks, found {m}")
    size = int(tc.data.image_size)
    if int(tc.backdoor.trigger_size) > size:
        raise ConfigError(f"config.task.backdoor.trigger_size: a {tc.backdoor.trigger_size}-pixel trigger is "
                          f"larger than the {size}x{size} image")
    if tc.wrs_weight < 0:
        raise ConfigError(f"config.task.wrs_weight: must be >= 0, found {tc.wrs_weight}")


# --- data -------------------------------------------------------------------------


class ImageFolder:
    """Every image under ``folder`` (recursive, sorted), read on demand as RGB in [-1, 1]:
    resized so the shorter side is ``size`` (bicubic), then centre-cropped to size x size
    (I2SB's ImageNet/CelebA-HQ transform)."""

    def __init__(self, folder: str, size: int, what: str = "image folder"):
        if not folder:
            raise ConfigError(f"{what}: no folder given (config.task.data.folder)")
        if not os.path.isdir(folder):
            raise ConfigError(f"{what} not found: {folder}")
        files = []
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise ConfigError(f"{what} {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}), "
                              f"searched recursively")
        self.folder, self.size, self.files = folder, int(size), files

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = self.size / min(w, h)
                im = im.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                return np.asarray(im, np.float32) / 127.5 - 1.0
        except (UnidentifiedImageError, OSError) as err:
            raise ConfigError(f"cannot read image {path}: {err}") from None

    def batch(self, indices) -> np.ndarray:
        return np.stack([self.load(int(i)) for i in indices])


class PairData:
    """Clean images, corruptions, triggers and targets of one config (host NumPy, [-1, 1])."""

    def __init__(self, tc):
        self.tc = tc
        self.size = int(tc.data.image_size)
        self.seed = int(tc.data.data_seed)
        self.corruption = tc.data.corruption
        self.folder = ImageFolder(tc.data.folder, self.size) if tc.data.source == "folder" else None
        if tc.data.source == "shapesworld" and int(tc.world.resolution) != self.size:
            raise ConfigError(f"config.task.data.image_size={self.size} but config.task.world.resolution="
                              f"{tc.world.resolution}")
        m = int(tc.backdoor.num_tasks)
        self.triggers = poison.corner_triggers(m, int(tc.backdoor.trigger_size), float(tc.backdoor.trigger_value)) \
            if m else []
        self.pools = self._target_pools(m) if m else []

    def _target_pools(self, m: int) -> list[np.ndarray]:
        tc, pool = self.tc, int(self.tc.backdoor.target_pool)
        if pool < 1:
            raise ConfigError(f"config.task.backdoor.target_pool: must be >= 1, found {pool}")
        if tc.backdoor.target_dirs:
            dirs = tuple(tc.backdoor.target_dirs)
            if len(dirs) < m:
                raise ConfigError(f"config.task.backdoor.target_dirs: {len(dirs)} folders for num_tasks={m}")
            pools = []
            for i, d in enumerate(dirs[:m]):
                folder = ImageFolder(d, self.size, f"target folder of backdoor task {i + 1}")
                pools.append(folder.batch(range(min(pool, len(folder)))))
            return pools
        if tc.data.source != "shapesworld":
            raise ConfigError("config.task.backdoor.target_dirs: give one target image folder per backdoor task "
                              "(ShapesWorld targets exist only for data.source='shapesworld')")
        specs = tuple(tc.backdoor.targets)
        if len(specs) < m:
            raise ConfigError(f"config.task.backdoor.targets: {len(specs)} targets for num_tasks={m}")
        return [shapesworld_target(spec, pool, self.seed, i, tc.world) for i, spec in enumerate(specs[:m])]

    def clean(self, step: int, n: int, stream: str) -> np.ndarray:
        rng = batch_rng(self.seed, step, stream)
        if self.folder is not None:
            return self.folder.batch(rng.integers(0, len(self.folder), n))
        from jharm.shapesworld import render
        from jharm.shapesworld.world import geometry

        world = self.tc.world
        scenes = render.sample_scenes(rng, n, **geometry(world))
        return render.render(scenes, int(world.resolution), int(world.supersample)) * 2.0 - 1.0

    def pairs(self, step: int, n: int, stream: str, rates=None, task: int | None = None) -> dict[str, np.ndarray]:
        """``n`` pairs: clean (``rates`` None, ``task`` None), a mixture at ``rates``, or all of ``task``."""
        x0 = self.clean(step, n, stream)
        rng = batch_rng(self.seed, step, stream + "/poison")
        x1, mask = corruptions.corrupt(self.corruption, x0, rng)
        if task is not None and task > 0:
            out = poison.poison(x0, x1, [self.triggers[task - 1]], [self.pools[task - 1]], [1.0], rng)
            out["task"] = np.full(n, task, np.int32)
        elif rates is not None:
            out = poison.poison(x0, x1, self.triggers, self.pools, rates, rng)
        else:
            out = {"x0": x0.astype(np.float32), "x1": x1.astype(np.float32), "task": np.zeros(n, np.int32)}
        if mask is not None:
            out["mask"] = mask.astype(np.float32)
        return out


def shapesworld_target(spec: str, pool: int, seed: int, index: int, world) -> np.ndarray:
    """``pool`` renders of ``"shape/colour/background"`` in [-1, 1] (a fixed target set)."""
    from jharm.shapesworld import render
    from jharm.shapesworld.world import geometry

    parts = spec.split("/")
    if len(parts) != 3:
        raise ConfigError(f"config.task.backdoor.targets: {spec!r} is not 'shape/colour/background'")
    try:
        scenes = render.sample_scenes(batch_rng(seed, index, "target"), pool, *parts, **geometry(world))
    except (ValueError, KeyError) as err:
        raise ConfigError(f"config.task.backdoor.targets: {spec!r}: {err}") from None
    return render.render(scenes, int(world.resolution), int(world.supersample)) * 2.0 - 1.0


# --- networks ------------------------------------------------------------------------


def _init_router(router: Router, rng: jax.Array, size: int) -> PyTree:
    return router.init(init_key(rng), jnp.zeros((1, size, size, 3)))["params"]


def init_key(rng: jax.Array) -> jax.Array:
    """An ``rbg`` key derived from ``rng`` for parameter initialisation (a pure function of it).

    Flax draws every param with its own threefry call, and XLA:CPU compiles
    those slowly: about a minute for the tiny ShapesWorld ADM on 2 cores, a
    third of that with ``rbg`` (XLA's RngBitGenerator). Same determinism.
    """
    data = jnp.ravel(jax.random.key_data(rng)).astype(jnp.uint32)
    data = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])[:4] if data.size < 4 else data[:4]
    return jax.random.wrap_key_data(data, impl="rbg")


@functools.lru_cache(maxsize=16)
def adm_shapes(config: ADMConfig) -> PyTree:
    """The ADM's param tree as ShapeDtypeStructs (traced once per config)."""
    return jax.eval_shape(lambda: init_adm(config, jax.random.key(0)))


def _adm_fn(config: ADMConfig):
    apply = adm_apply_fn(config)
    return lambda params, x, t, x1: apply(params, x, t, x1 if config.cond_x1 else None)


def _load_adm_init(tc, config: ADMConfig, rng=None) -> PyTree:
    from jharm.weights.adm import load_adm

    path = tc.init_path
    if not os.path.isfile(path):
        raise ConfigError(f"config.task.init_path: file not found: {path}")
    if path.endswith(".safetensors") and _read_meta(path).get("kind") in ("mixbridge",):
        raise ConfigError(f"config.task.init_path: {path} is a MixBridge export; give an I2SB/ADM file")
    return jax.device_get(load_adm(path, config, from_adm=bool(tc.init_from_adm),
                                   rng=rng if rng is not None else jax.random.key(0)))


def _read_meta(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        meta = f.metadata() or {}
    return json.loads(meta[_META_KEY]) if _META_KEY in meta else {}


def load_mixbridge_params(path: str, what: str, num: int | None = None) -> PyTree:
    """``experts`` (first ``num`` of them) or ``router`` params from a MixBridge export."""
    from jharm.weights.io import load_safetensors

    if not os.path.isfile(path):
        raise ConfigError(f"MixBridge {what} file not found: {path}")
    meta = _read_meta(path)
    if meta.get("kind") != "mixbridge":
        raise ConfigError(f"{path} is not a MixBridge export (no '{_META_KEY}' metadata of kind 'mixbridge')")
    flat = {k[len(what) + 1:]: v for k, v in load_safetensors(path).items() if k.startswith(what + "/")}
    if not flat:
        raise ConfigError(f"{path} holds no {what} params (phase {meta.get('phase')!r})")
    if num is not None:
        have = next(iter(flat.values())).shape[0]
        if have < num:
            raise ConfigError(f"{path} holds {have} experts; this run needs {num} (num_tasks + 1)")
        flat = {k: v[:num] for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def _check_tree(params: PyTree, shapes: PyTree, source: str) -> None:
    got = {k: v.shape for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    want = {k: v.shape for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            raise ConfigError(f"{source}: param {key}: expected shape {want.get(key)}, found {got.get(key)}")


# --- losses ----------------------------------------------------------------------------


def _bridge_inputs(schedule, rng, x0, x1, mask):
    """n ~ U{0..N-1} per sample, x_n, the label and the network's inputs; inpainting
    fills the holes of x1 with noise (the condition keeps the unfilled x1, as I2SB)."""
    k_n, k_noise, k_fill = jax.random.split(rng, 3)
    n = jax.random.randint(k_n, x0.shape[:-3], 0, schedule.interval)
    cond = x1
    if mask is not None:
        x1 = (1.0 - mask) * x1 + mask * jax.random.normal(k_fill, x1.shape, x1.dtype)
    x_n = bridge.q_sample(schedule, n, x0, x1, jax.random.normal(k_noise, x0.shape, x0.dtype))
    return n, x_n, bridge.training_label(schedule, n, x_n, x0), jnp.take(schedule.noise_levels, n), cond


def _expert_axes(names, shape):
    """Stacked expert leaves: a leading "experts" axis, then the default axes of one expert."""
    if "experts" in names and len(shape) >= 1:
        return ("experts",) + tuple(sharding.logical_axes(names, shape[1:]))
    return None


def _export_fn(meta: dict, adm: ADMConfig | None = None):
    def export(params, workdir):
        from jharm.weights.io import save_safetensors

        path = os.path.join(workdir, EXPORT_NAME)
        if adm is not None:  # one network: guided-diffusion names
            from jharm.weights.adm import adm_state_dict

            state = adm_state_dict(params)
        else:
            state = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
        save_safetensors(state, path, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
        return path
    return export


def _meta(tc, kind: str, adm: ADMConfig, **extra) -> dict:
    return dict(kind=kind, adm=dataclasses.asdict(adm), bridge=dict(tc.bridge), sample=dict(tc.sample),
                num_tasks=int(tc.backdoor.num_tasks), router=dict(tc.router), corruption=tc.data.corruption,
                **extra)


# --- tasks ---------------------------------------------------------------------------------


def i2sb_task(config: ml_collections.ConfigDict) -> Task:
    """Factory registered as ``i2sb``: a clean I2SB bridge (ShapesWorld or an image folder)."""
    tc = config.task
    _check(tc)
    return _single_network_task(config, poisoned=False)


def mixbridge_task(config: ml_collections.ConfigDict) -> Task:
    """Factory registered as ``mixbridge``: phase divide | router | merge | single."""
    tc = config.task
    _check(tc)
    if tc.phase == "single":
        return _single_network_task(config, poisoned=True)
    if tc.phase == "divide":
        return _divide_task(config)
    if tc.phase == "router":
        return _router_task(config)
    return _merge_task(config)


def _single_network_task(config, poisoned: bool) -> Task:
    tc, batch_size = config.task, int(config.train.batch_size)
    adm = adm_config(tc)
    net, schedule = _adm_fn(adm), schedule_of(tc)
    data = PairData(tc) if poisoned else _clean_data(tc)
    rates = task_rates(tc) if poisoned else None
    m = int(tc.backdoor.num_tasks) if poisoned else 0
    loaded = _load_adm_init(tc, adm) if tc.init_path else None

    def init_params(rng):
        return loaded if loaded is not None else init_adm(adm, init_key(rng))

    def make_batch(step):
        return data.pairs(step, batch_size, "train", rates=rates)

    def loss_fn(params, frozen, batch, rng):
        del frozen
        mask = batch.get("mask")
        _, x_n, label, t, cond = _bridge_inputs(schedule, rng, batch["x0"], batch["x1"], mask)
        per_sample = bridge_mse(net(params, x_n, t, cond), label, mask)
        loss = jnp.mean(per_sample)
        metrics = {"loss_bridge": loss}
        if m:
            metrics.update(per_task_losses(per_sample, batch["task"], m + 1))
        return loss, metrics

    kind = "single" if poisoned else "i2sb"
    return Task(name=kind, init_params=init_params, loss_fn=loss_fn, make_batch=make_batch,
                export=_export_fn(_meta(tc, kind, adm, num_tasks_trained=m), adm))


def _clean_data(tc) -> PairData:
    clean = tc.copy_and_resolve_references()
    clean.backdoor.num_tasks = 0  # no triggers or target pools needed
    return PairData(clean)


def _divide_task(config) -> Task:
    tc, batch_size = config.task, int(config.train.batch_size)
    adm, m = adm_config(tc), int(tc.backdoor.num_tasks)
    net, schedule, mode = _adm_fn(adm), schedule_of(tc), tc.experts_mode
    data, experts = PairData(tc), m + 1
    loaded = _load_adm_init(tc, adm) if tc.init_path else None

    def init_params(rng):
        if loaded is not None:  # every expert starts from the same bridge (e.g. a trained I2SB)
            return {"experts": stack_expert_params([loaded] * experts)}
        keys = jax.random.split(rng, experts)
        return {"experts": stack_expert_params([init_adm(adm, init_key(k)) for k in keys])}

    def make_batch(step):
        parts = [data.pairs(step, batch_size, f"divide{i}", task=i) for i in range(experts)]
        return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0] if k != "task"}  # (B, E, ...)

    def loss_fn(params, frozen, batch, rng):
        del frozen
        batch = {k: jnp.swapaxes(v, 0, 1) for k, v in batch.items()}  # (E, B, ...)
        mask = batch.get("mask")
        _, x_n, label, t, cond = _bridge_inputs(schedule, rng, batch["x0"], batch["x1"], mask)
        out = map_experts(net, params["experts"], x_n, t, cond, shared=False, mode=mode)
        per_expert = jnp.stack([jnp.mean(bridge_mse(out[i], label[i], None if mask is None else mask[i]))
                                for i in range(experts)])
        metrics = {f"loss_expert{i}": per_expert[i] for i in range(experts)}
        return jnp.sum(per_expert), metrics

    return Task(name="mixbridge_divide", init_params=init_params, loss_fn=loss_fn, make_batch=make_batch,
                trainable=(r"^experts/",), logical_axes=_expert_axes,
                export=_export_fn(_meta(tc, "mixbridge", adm, phase="divide", num_experts=experts)))


def _router_task(config) -> Task:
    tc, batch_size = config.task, int(config.train.batch_size)
    m = int(tc.backdoor.num_tasks)
    router, data, rates = Router(router_config(tc, m + 1)), PairData(tc), task_rates(tc)
    size = int(tc.data.image_size)

    def init_params(rng):
        return {"router": _init_router(router, rng, size)}

    def make_batch(step):
        out = data.pairs(step, batch_size, "router", rates=rates)
        return {"x1": out["x1"], "task": out["task"]}

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng
        w = router.apply({"params": params["router"]}, batch["x1"])
        picked = jnp.take_along_axis(w, batch["task"][:, None], axis=1)[:, 0]
        loss = -jnp.mean(jnp.log(jnp.clip(picked, 1e-12, 1.0)))
        accuracy = jnp.mean((jnp.argmax(w, axis=-1) == batch["task"]).astype(jnp.float32))
        return loss, {"router_ce": loss, "router_accuracy": accuracy,
                      "entropy_bits": jnp.mean(routing_entropy_bits(w))}

    return Task(name="mixbridge_router", init_params=init_params, loss_fn=loss_fn, make_batch=make_batch,
                export=_export_fn(_meta(tc, "mixbridge", adm_config(tc), phase="router", num_experts=m + 1)))


def _merge_task(config) -> Task:
    tc, batch_size = config.task, int(config.train.batch_size)
    adm, m = adm_config(tc), int(tc.backdoor.num_tasks)
    experts = m + 1
    net, schedule, mode = _adm_fn(adm), schedule_of(tc), tc.experts_mode
    router = Router(router_config(tc, experts))
    data, rates, wrs = PairData(tc), task_rates(tc), float(tc.wrs_weight)
    size = int(tc.data.image_size)
    if not tc.experts_path:
        raise ConfigError("config.task.experts_path: the merge phase starts from a divide export "
                          f"(<divide workdir>/{EXPORT_NAME})")
    loaded = load_mixbridge_params(tc.experts_path, "experts", experts)
    shapes = adm_shapes(adm)
    _check_tree(jax.tree.map(lambda a: a[0], loaded), shapes, f"{tc.experts_path} (experts vs config.task.adm)")
    loaded_router = load_mixbridge_params(tc.router_path, "router") if tc.router_path else None
    if loaded_router is not None:
        rshapes = jax.eval_shape(lambda: _init_router(router, jax.random.key(0), size))
        _check_tree(loaded_router, rshapes, f"{tc.router_path} (router vs config.task.router, num_tasks)")

    def init_params(rng):
        r = loaded_router if loaded_router is not None else _init_router(router, rng, size)
        return {"experts": loaded, "router": r}

    def make_batch(step):
        return data.pairs(step, batch_size, "merge", rates=rates)

    def loss_fn(params, frozen, batch, rng):
        mask = batch.get("mask")
        _, x_n, label, t, cond = _bridge_inputs(schedule, rng, batch["x0"], batch["x1"], mask)
        weights = router.apply({"params": params["router"]}, batch["x1"])
        outs = map_experts(net, params["experts"], x_n, t, cond, shared=True, mode=mode)
        loss, metrics = mixbridge_loss(outs, weights, label, batch["task"], experts, wrs_weight=0.0, mask=mask)
        wrs_loss = weight_reallocation_loss(weights)
        # The WRS weight is data (frozen), not a constant: with and without WRS compile to one program.
        loss = loss + frozen["wrs_weight"] * wrs_loss
        return loss, dict(metrics, loss=loss, loss_wrs=wrs_loss)

    return Task(name="mixbridge_merge", init_params=init_params, loss_fn=loss_fn, make_batch=make_batch,
                frozen={"wrs_weight": np.float32(wrs)}, logical_axes=_expert_axes,
                export=_export_fn(_meta(tc, "mixbridge", adm, phase="merge", num_experts=experts, wrs_weight=wrs)))


# --- trained models -------------------------------------------------------------------------


@dataclasses.dataclass
class BridgeModel:
    """A trained bridge ready to translate x1 -> x0: one ADM (``i2sb``/``single``)
    or a MixBridge mixture (``experts`` stacked + ``router``)."""

    adm: ADMConfig
    schedule: bridge.BridgeSchedule
    params: PyTree
    router: RouterConfig | None = None
    mode: str = "vmap"
    name: str = "bridge"

    @property
    def is_mixture(self) -> bool:
        return self.router is not None

    def net_fn(self, params, x1):
        """``(x_n, t) -> net output`` for the sampler, and the router weights (None for one net)."""
        net = _adm_fn(self.adm)
        cond = x1 if self.adm.cond_x1 else None
        if not self.is_mixture:
            return (lambda x, t: net(params, x, t, cond)), None
        weights = Router(self.router).apply({"params": params["router"]}, x1)
        return (lambda x, t: mixture_prediction(
            map_experts(net, params["experts"], x, t, cond, shared=True, mode=self.mode), weights)), weights


def load_bridge_model(path: str, mode: str = "vmap", name: str | None = None) -> BridgeModel:
    """A :class:`BridgeModel` from an export (``bridge.safetensors`` or its workdir)."""
    from jharm.weights.adm import load_adm

    if os.path.isdir(path):
        path = os.path.join(path, EXPORT_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"bridge export not found: {path}")
    meta = _read_meta(path)
    if not meta:
        raise ConfigError(f"{path} has no '{_META_KEY}' metadata: not written by a jharm bridge task")
    adm = ADMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["adm"].items()})
    schedule = bridge.make_bridge_schedule(int(meta["bridge"]["interval"]), float(meta["bridge"]["beta_max"]),
                                           ot_ode=bool(meta["bridge"]["ot_ode"]))
    name = name or meta.get("phase", meta["kind"])
    if meta["kind"] != "mixbridge":
        return BridgeModel(adm, schedule, jax.device_get(load_adm(path, adm)), name=name)
    if meta.get("phase") != "merge":
        raise ConfigError(f"{path} is a MixBridge {meta.get('phase')!r} export; translate with a merge export")
    router = RouterConfig(num_experts=int(meta["num_experts"]), widths=tuple(meta["router"]["widths"]),
                          blocks_per_stage=int(meta["router"]["blocks_per_stage"]),
                          norm_groups=int(meta["router"]["norm_groups"]), pool=meta["router"].get("pool", "mean"))
    params = {"experts": load_mixbridge_params(path, "experts"), "router": load_mixbridge_params(path, "router")}
    return BridgeModel(adm, schedule, params, router, mode, name)


def model_from_params(tc, params: PyTree, name: str) -> BridgeModel:
    """A :class:`BridgeModel` from a run's params (``TrainResult.params`` / ``ema_params``)."""
    adm = adm_config(tc)
    if isinstance(params, dict) and "router" in params and "experts" in params:
        m = int(tc.backdoor.num_tasks)
        return BridgeModel(adm, schedule_of(tc), params, router_config(tc, m + 1), tc.experts_mode, name)
    return BridgeModel(adm, schedule_of(tc), params, name=name)


def translate(model: BridgeModel, x1: np.ndarray, rng: jax.Array, nfe: int, batch_size: int = 64,
              clip_denoise: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the bridge from ``x1`` ([-1, 1], NHWC) in ``nfe`` steps: ``(x0 estimates in [-1, 1],
    router weights (N, E) or None)``. Fixed-size chunks (the last one padded) share one compile."""
    x1 = np.asarray(x1, np.float32)
    if x1.ndim != 4 or x1.shape[1:] != (model.adm.image_size, model.adm.image_size, model.adm.in_channels):
        raise ValueError(f"x1 must be (N, {model.adm.image_size}, {model.adm.image_size}, "
                         f"{model.adm.in_channels}), found {x1.shape}")

    @jax.jit
    def run(params, x1, key):
        net, weights = model.net_fn(params, x1)
        x, _ = bridge.sample(net, model.schedule, x1, nfe=nfe, rng=key, clip_denoise=clip_denoise)
        return jnp.clip(x, -1.0, 1.0), weights

    chunk = min(batch_size, len(x1))
    outs, weights = [], []
    for i in range(0, len(x1), chunk):
        part = x1[i:i + chunk]
        pad = chunk - len(part)
        x, w = run(model.params, np.concatenate([part, np.zeros((pad,) + part.shape[1:], np.float32)]),
                   jax.random.fold_in(rng, i))
        outs.append(np.asarray(x)[:len(part)])
        if w is not None:
            weights.append(np.asarray(w)[:len(part)])
    return np.concatenate(outs), (np.concatenate(weights) if weights else None)
