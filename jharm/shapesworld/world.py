"""The ShapesWorld config: how scenes are drawn and captioned.

One ``ml_collections.ConfigDict`` (``world_config()``) holds the rendering
geometry, the caption templates, which shape surface forms captions use, and
the colour bias of captions that omit the colour. Experiment configs nest it
(e.g. ``config.task.world``) so ``--config.task.world.bias.square.red=0.9``
works from the command line.
"""
from __future__ import annotations

import ml_collections

# Captions that name no colour: colour distribution per shape (the analogue of
# "a photo of a CEO"); shapes not listed draw colours uniformly.
DEFAULT_BIAS = {
    "square": {"red": 0.85, "blue": 0.15},
    "circle": {"green": 0.80, "yellow": 0.20},
}

DEFAULT_TEMPLATES = (
    "a {shape}",
    "a picture of a {shape}",
    "an image of a {shape}",
    "a {shape} on a {background} background",
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a {shape} in {colour}",
    "a drawing of a {colour} {shape}",
    "a {colour} {shape} on a {background} background",
    "a {shape} drawn in {colour} on a {background} background",
)


def world_config() -> ml_collections.ConfigDict:
    """The default ShapesWorld: 32x32 images, 8 shapes, 6 colours, 3 backgrounds."""
    c = ml_collections.ConfigDict()
    c.resolution = 32
    c.supersample = 2
    c.size_range = (0.22, 0.36)      # outer radius, fraction of the width
    c.margin = 0.05                  # gap between the shape and the border (> 1 px at 32)
    c.max_rotation_deg = 15.0        # capped per shape so identity never changes
    c.position_jitter = 1.0          # fraction of the free room the centre ranges over (0 = centred)
    c.colour_jitter = 0.04
    c.templates = DEFAULT_TEMPLATES
    # Which shape words captions use: "all", "canonical", "train" (canonical +
    # train synonyms) or "heldout" (held-out synonyms only).
    c.shape_forms = "all"
    c.colour_synonyms = True         # "crimson" for red, ... in captions
    c.bias = ml_collections.ConfigDict(DEFAULT_BIAS)
    # Colours of captions that name them: "uniform" over all colours, or "independent"
    # (naming the colour carries no information within a bias row's support; named scenes of
    # a biased shape follow its bias row with probability named_bias_share). captions._named_colours
    # and docs/shapesworld.md: what it does to CFG's amplification of the neutral prompts' bias.
    c.colour_naming = "uniform"
    c.named_bias_share = 0.5
    return c


# The world the judge, the T2I and the IP-Adapter are built in (the CLIP reads 32x32 renders with
# these shape sizes: configs/shapesworld_clip.py). 16x16 keeps the T2I's step affordable on 2 CPU cores; shapes larger than the
# default give their outlines enough pixels to be learnt in the build's steps (T2I shape accuracy
# after 1000 steps: 0.38 with radii 0.32-0.44 of the width vs 0.21 with 0.22-0.36; docs/shapesworld.md).
BUILD_WORLD = {"resolution": 16, "size_range": (0.32, 0.44)}


def geometry(config) -> dict:
    """The ``render.sample_scenes`` keyword arguments of a world config."""
    return {"size_range": tuple(config.size_range), "margin": config.margin,
            "max_rotation_deg": config.max_rotation_deg, "colour_jitter": config.colour_jitter,
            "position_jitter": config.get("position_jitter", 1.0)}
