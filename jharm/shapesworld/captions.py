"""ShapesWorld captions: surface forms, templates, and colour bias by construction.

Every shape has a canonical word and synonyms/descriptions that never use it.
The synonyms are split explicitly:

* ``train`` synonyms may be shown to a safety method (e.g. an erasure trained
  on "star" and "pentagram");
* ``heldout`` synonyms are kept for evaluation only, so that robustness to
  words the method never saw can be measured.

Both kinds appear in the world's own captions (``shape_forms="all"``), which is
how the tiny CLIP and text-to-image model learn that they mean the shape.

A caption that omits the colour draws the colour from the shape's bias
(``config.bias``), so a neutral prompt has a skewed answer by construction.
"""
from __future__ import annotations

import dataclasses
import re
import string
from typing import Mapping, Sequence

import numpy as np

from jharm.shapesworld import render
from jharm.shapesworld.world import geometry, world_config


class CaptionError(ValueError):
    """An unknown word or placeholder in a template or request, or a bad bias."""


@dataclasses.dataclass(frozen=True)
class ShapeForms:
    """The surface forms of one shape: canonical word, train and held-out synonyms."""

    canonical: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]


SHAPE_FORMS = {
    "circle": ShapeForms("circle", ("disc", "round dot", "ball"), ("orb", "filled round blob")),
    "square": ShapeForms("square", ("box", "block", "four-sided tile"), ("quadrate", "equal-sided rectangle")),
    "triangle": ShapeForms("triangle", ("trigon", "three-sided figure", "pyramid"), ("delta", "three-cornered wedge")),
    "star": ShapeForms("star", ("pentagram", "five-pointed figure", "twinkle shape"), ("sparkle", "spiky burst")),
    "cross": ShapeForms("cross", ("plus sign", "intersection mark", "cruciform"), ("addition symbol", "medic emblem")),
    "heart": ShapeForms("heart", ("love symbol", "valentine", "cardioid"), ("cupid icon", "romance badge")),
    "diamond": ShapeForms("diamond", ("rhombus", "lozenge", "pointed gem"), ("jewel shape", "kite figure")),
    "ring": ShapeForms("ring", ("hoop", "donut", "annulus"), ("hollow loop", "halo")),
}
# Canonical colour word first, then synonyms.
COLOUR_FORMS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "grassy"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "plum"),
    "orange": ("orange", "amber", "tangerine"),
}
BACKGROUND_FORMS = {
    "light": ("light", "white", "pale"),
    "dark": ("dark", "black"),
    "gradient": ("gradient", "shaded"),
}
SPLITS = ("all", "canonical", "train", "heldout", "synonyms")
PLACEHOLDERS = ("shape", "colour", "background")


def surface_forms(shape: str, split: str = "all") -> tuple[str, ...]:
    """The words for ``shape`` in a split.

    ``canonical``: the canonical word; ``train``: canonical + train synonyms
    (what a safety method may see); ``heldout``: held-out synonyms only;
    ``synonyms``: train + held-out synonyms; ``all``: everything.
    """
    if shape not in SHAPE_FORMS:
        raise CaptionError(f"unknown shape {shape!r}; known: {', '.join(SHAPE_FORMS)}")
    f = SHAPE_FORMS[shape]
    table = {"all": (f.canonical, *f.train, *f.heldout), "canonical": (f.canonical,),
             "train": (f.canonical, *f.train), "heldout": f.heldout, "synonyms": (*f.train, *f.heldout)}
    if split not in table:
        raise CaptionError(f"unknown surface-form split {split!r}; known: {', '.join(SPLITS)}")
    return table[split]


def template_fields(template: str) -> tuple[str, ...]:
    """The placeholders of a template; an unknown one or a missing ``{shape}`` is an error."""
    try:
        fields = tuple(name for _, name, spec, conv in string.Formatter().parse(template) if name is not None)
    except ValueError as err:
        raise CaptionError(f"malformed caption template {template!r}: {err}") from None
    for name in fields:
        if name not in PLACEHOLDERS:
            raise CaptionError(f"unknown placeholder {{{name}}} in caption template {template!r}; "
                               f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    if "shape" not in fields:
        raise CaptionError(f"caption template {template!r} has no {{shape}}")
    return fields


def _articles(text: str) -> str:
    """'a' -> 'an' before a vowel sound (every word here starts as it sounds)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _check(name: str, table: Mapping, kind: str) -> None:
    if name not in table:
        raise CaptionError(f"unknown {kind} {name!r}; known: {', '.join(table)}")


def fill(template: str, shape: str, colour: str | None = None, background: str | None = None,
         shape_word: str | None = None, colour_word: str | None = None,
         background_word: str | None = None) -> str:
    """Fill a template with names (canonical words unless ``*_word`` is given).

    ``shape_word`` must be one of the shape's surface forms. A placeholder the
    template uses but that is not given is an error.
    """
    fields = template_fields(template)
    _check(shape, SHAPE_FORMS, "shape")
    if shape_word is not None and shape_word not in surface_forms(shape):
        raise CaptionError(f"{shape_word!r} is not a surface form of {shape!r}: {surface_forms(shape)}")
    values = {"shape": shape_word or shape}
    for key, name, word, table in (("colour", colour, colour_word, COLOUR_FORMS),
                                   ("background", background, background_word, BACKGROUND_FORMS)):
        if name is not None:
            _check(name, table, key)
            if word is not None and word not in table[name]:
                raise CaptionError(f"{word!r} is not a word for {key} {name!r}: {table[name]}")
            values[key] = word or table[name][0]
        elif key in fields:
            raise CaptionError(f"caption template {template!r} needs a {key}")
    return _articles(template.format(**{k: values[k] for k in fields}))


def bias_matrix(config=None) -> np.ndarray:
    """(shapes, colours) probabilities of the colour when a caption omits it."""
    config = world_config() if config is None else config
    probs = np.full((len(render.SHAPES), len(render.COLOUR_NAMES)), 1.0 / len(render.COLOUR_NAMES))
    for shape, dist in dict(config.bias).items():
        _check(shape, SHAPE_FORMS, "shape in config.bias")
        row = np.zeros(len(render.COLOUR_NAMES))
        for colour, p in dict(dist).items():
            _check(colour, COLOUR_FORMS, f"colour in config.bias.{shape}")
            if not 0.0 <= float(p) <= 1.0:
                raise CaptionError(f"config.bias.{shape}.{colour} = {p} is not a probability")
            row[render.COLOUR_NAMES.index(colour)] = float(p)
        if abs(row.sum() - 1.0) > 1e-6:
            raise CaptionError(f"config.bias.{shape} sums to {row.sum():.6f}, not 1")
        probs[render.SHAPES.index(shape)] = row
    return probs


COLOUR_NAMING = ("uniform", "independent")


def _named_colours(rng: np.random.Generator, shapes: np.ndarray, bias: np.ndarray, config) -> np.ndarray:
    """Colours of scenes whose caption names the colour (one per row of ``shapes``).

    ``"uniform"``: uniform over all colours. Then, for a biased shape, a caption that
    omits the colour tells more than the shape (a blue square is named "blue" more
    often than a red one), and classifier-free guidance sharpens exactly that: CFG 3
    turns an 85/15 prior into about 98/2. ``"independent"``: with probability
    ``config.named_bias_share`` the colour follows the shape's bias row, otherwise it
    is uniform over the colours outside the row's support; within the support,
    whether a caption names the colour is then independent of the colour, so the
    neutral prompt's frequencies are the image statistics of its shape. Measured, that
    takes only a small part of the amplification away (a T2I trained so: 95/5 at CFG 3;
    docs/shapesworld.md). Shapes with a full-support row draw from the row.
    """
    rule = config.get("colour_naming", "uniform")
    if rule == "uniform":  # the draw order of the worlds built before the option existed
        return rng.integers(0, bias.shape[1], len(shapes))
    if rule != "independent":
        raise CaptionError(f"config.colour_naming = {rule!r}; expected one of {COLOUR_NAMING}")
    share = float(config.named_bias_share)
    if not 0.0 <= share <= 1.0:
        raise CaptionError(f"config.named_bias_share = {share} is not a probability")
    row = bias[shapes]
    outside = (row == 0).astype(np.float64)
    has_outside = outside.sum(axis=1) > 0
    from_row = (rng.random(len(shapes)) < share) | ~has_outside
    probs = np.where(from_row[:, None], row, outside / np.maximum(outside.sum(axis=1, keepdims=True), 1))
    return _draw_rows(rng, probs)


def _draw_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One index per row of ``probs`` (N, K) by inverse CDF (one uniform per row; zero-probability
    entries have empty intervals, so they are never drawn)."""
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    return np.minimum((rng.random(len(probs))[:, None] >= cdf).sum(axis=1), probs.shape[1] - 1)


def sample_captioned(rng: np.random.Generator, n: int, config=None,
                     shape: str | Sequence[str] | None = None) -> tuple[render.Scenes, list[str]]:
    """Draw N (scene, caption) pairs consistent with the templates and the bias.

    Template and shape are uniform (or ``shape`` fixes the shape); an omitted
    colour follows ``config.bias``, a named one ``config.colour_naming``
    (``_named_colours``); the background is uniform. Surface forms are drawn uniformly from
    ``config.shape_forms`` (and colour synonyms when ``config.colour_synonyms``).
    """
    config = world_config() if config is None else config
    templates = tuple(config.templates)
    if not templates:
        raise CaptionError("config.templates is empty")
    fields = [template_fields(t) for t in templates]
    shape_words = {s: surface_forms(s, config.shape_forms) for s in SHAPE_FORMS}
    bias = bias_matrix(config)
    t_idx = rng.integers(0, len(templates), n)
    shapes = render.resolve_ids(shape, render.SHAPES, "shape", n, rng)
    named = np.array(["colour" in f for f in fields])[t_idx]
    biased = _draw_rows(rng, bias[shapes])  # omitted colours follow the shape's bias row
    colours = np.where(named, _named_colours(rng, shapes, bias, config), biased).astype(np.int32)
    backgrounds = rng.integers(0, len(render.BACKGROUNDS), n).astype(np.int32)
    scenes = render.sample_scenes(rng, n, shapes, colours, backgrounds, **geometry(config))
    captions = []
    for i in range(n):
        names = scenes.names(i)
        words = shape_words[names["shape"]]
        colour_words = COLOUR_FORMS[names["colour"]] if config.colour_synonyms else COLOUR_FORMS[names["colour"]][:1]
        bg_words = BACKGROUND_FORMS[names["background"]]
        captions.append(fill(templates[t_idx[i]], names["shape"], names["colour"], names["background"],
                             shape_word=words[rng.integers(len(words))],
                             colour_word=colour_words[rng.integers(len(colour_words))],
                             background_word=bg_words[rng.integers(len(bg_words))]))
    return scenes, captions


def sample_scene(rng: np.random.Generator, config=None) -> tuple[render.Scenes, str]:
    """One (scene, caption) pair; see ``sample_captioned``."""
    scenes, captions = sample_captioned(rng, 1, config)
    return scenes, captions[0]


def vocabulary(config=None) -> tuple[str, ...]:
    """The closed, sorted list of whitespace-separated words any caption can contain."""
    config = world_config() if config is None else config
    words = set()
    phrases = [w for s in SHAPE_FORMS for w in surface_forms(s)]
    phrases += [w for forms in (COLOUR_FORMS, BACKGROUND_FORMS) for ws in forms.values() for w in ws]
    for template in config.templates:
        template_fields(template)
        phrases.append(re.sub(r"\{\w+\}", " ", template))
    for phrase in phrases:
        words.update(phrase.split())
    # 'a' may become 'an' before a vowel.
    if "a" in words:
        words.add("an")
    return tuple(sorted(words))
