"""ShapesWorld renderer, captions and batch builders."""
import itertools
import re

import numpy as np
import pytest

from jharm.shapesworld import captions, data, render
from jharm.shapesworld.world import world_config

RES = 32


def one_scene(shape, colour="red", background="light", size=0.3, centre=(0.5, 0.5), rotation=0.0,
              rgb=None, level=0.9, n=1):
    """Scenes with exactly the given parameters (no jitter)."""
    f32 = np.float32
    rgb = render.COLOURS[colour] if rgb is None else rgb
    return render.Scenes(
        shape=np.full(n, render.SHAPES.index(shape), np.int32),
        colour=np.full(n, render.COLOUR_NAMES.index(colour), np.int32),
        background=np.full(n, render.BACKGROUNDS.index(background), np.int32),
        size=np.full(n, size, f32), centre=np.tile(np.array(centre, f32), (n, 1)),
        rotation=np.full(n, rotation, f32), rgb=np.tile(np.array(rgb, f32), (n, 1)),
        bg_lo=np.full(n, level, f32), bg_hi=np.full(n, level, f32), bg_angle=np.zeros(n, f32))


def coverage(image, rgb, level):
    """Fraction of each pixel covered by the shape, from the composited image."""
    rgb = np.asarray(rgb, np.float32)
    channel = int(np.argmax(np.abs(rgb - level)))
    return (image[..., channel] - level) / (rgb[channel] - level)


# Independent membership tests (plain geometry, not the renderer's signed
# distances), in the unit frame with y up.
def _inside_polygon(x, y, vertices):
    """Even-odd ray casting."""
    inside = np.zeros(x.shape, bool)
    for (x1, y1), (x2, y2) in zip(vertices, vertices[1:] + vertices[:1]):
        crosses = ((y1 > y) != (y2 > y)) & (x < (x2 - x1) * (y - y1) / (y2 - y1 + 1e-30) + x1)
        inside ^= crosses
    return inside


def _polar(radii, start, count):
    return [(r * np.sin(start + 2 * np.pi * i / count), r * np.cos(start + 2 * np.pi * i / count))
            for i, r in zip(range(count), itertools.cycle(radii))]


def reference_inside(shape, x, y):
    if shape == "circle":
        return x * x + y * y < 0.9 ** 2
    if shape == "ring":
        r = np.sqrt(x * x + y * y)
        return (r > 0.48) & (r < 0.92)
    if shape == "square":
        return (np.abs(x) < 0.7) & (np.abs(y) < 0.7)
    if shape == "triangle":
        return _inside_polygon(x, y, _polar([1.0], 0.0, 3))
    if shape == "star":
        return _inside_polygon(x, y, _polar([1.0, 0.45], 0.0, 10))
    if shape == "cross":
        return ((np.abs(x) < 0.85) & (np.abs(y) < 0.27)) | ((np.abs(x) < 0.27) & (np.abs(y) < 0.85))
    if shape == "diamond":
        return _inside_polygon(x, y, [(0, 0.95), (0.62, 0), (0, -0.95), (-0.62, 0)])
    if shape == "heart":
        h, c = 0.74, -0.15
        y = y - c
        square = _inside_polygon(x, y, [(0, h), (h, 0), (0, -h), (-h, 0)])
        r2 = h * h / 2
        return square | ((x + h / 2) ** 2 + (y - h / 2) ** 2 < r2) | ((x - h / 2) ** 2 + (y - h / 2) ** 2 < r2)
    raise AssertionError(shape)


def reference_coverage(shape, size, centre, rotation, res=RES, fine=16):
    """Box-filtered coverage from a fine grid of independent membership tests."""
    g = (np.arange(res * fine) + 0.5) / (res * fine)
    gx, gy = np.meshgrid(g, g)
    dx, dy = gx - centre[0], centre[1] - gy
    c, s = np.cos(rotation), np.sin(rotation)
    u, v = (c * dx + s * dy) / size, (c * dy - s * dx) / size
    inside = reference_inside(shape, u, v).astype(np.float64)
    return inside.reshape(res, fine, res, fine).mean(axis=(1, 3))


def test_images_are_float32_nhwc_in_unit_range():
    images, scenes = render.render_batch(0, 64)
    assert images.shape == (64, RES, RES, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert len(scenes) == 64 and scenes.size.dtype == np.float32 and scenes.centre.shape == (64, 2)


def test_same_seed_same_images_and_params():
    a, sa = render.render_batch(7, 32)
    b, sb = render.render_batch(7, 32)
    c, _ = render.render_batch(8, 32)
    np.testing.assert_array_equal(a, b)
    for field in ("shape", "colour", "background", "size", "centre", "rotation", "rgb", "bg_lo"):
        np.testing.assert_array_equal(getattr(sa, field), getattr(sb, field))
    assert np.abs(a - c).max() > 0.5


@pytest.mark.parametrize("shape", render.SHAPES)
@pytest.mark.parametrize("rotation", [0.0, 0.2])
def test_each_shape_matches_independent_geometry(shape, rotation):
    scenes = one_scene(shape, size=0.33, centre=(0.47, 0.52), rotation=rotation)
    image = render.render(scenes, RES, supersample=2)[0]
    got = coverage(image, render.COLOURS["red"], 0.9)
    want = reference_coverage(shape, 0.33, (0.47, 0.52), rotation)
    # Same area within 2 %, and pixel-wise agreement up to the anti-aliased rim.
    assert abs(got.sum() / want.sum() - 1.0) < 0.02, (got.sum(), want.sum())
    assert np.abs(got - want).mean() < 0.02
    assert np.abs(got - want).max() < 0.5
    # Away from the rim, pixels are fully in or out.
    solid = (want == 0) | (want == 1)
    assert np.abs(got - want)[solid].max() < 0.35


def test_shapes_are_pairwise_distinct():
    masks = {s: coverage(render.render(one_scene(s), RES)[0], render.COLOURS["red"], 0.9) for s in render.SHAPES}
    for a, b in itertools.combinations(render.SHAPES, 2):
        inter = np.minimum(masks[a], masks[b]).sum()
        union = np.maximum(masks[a], masks[b]).sum()
        assert inter / union < 0.85, (a, b, inter / union)
    # Identity-defining details: the ring has a hole, the circle has none.
    centre = RES // 2
    assert masks["ring"][centre - 1:centre + 1, centre - 1:centre + 1].max() < 0.01
    assert masks["circle"][centre - 1:centre + 1, centre - 1:centre + 1].min() > 0.99


def test_supersampling_and_resolution_agree():
    scenes = render.sample_scenes(np.random.default_rng(3), 32)
    coarse = render.render(scenes, RES, supersample=1)
    fine = render.render(scenes, RES, supersample=4)
    assert np.abs(coarse - fine).mean() < 0.01
    big = render.render(scenes, 2 * RES, supersample=2)
    pooled = data.downsample(big, 2)
    assert np.abs(pooled - fine).mean() < 0.01


@pytest.mark.parametrize("colour", render.COLOUR_NAMES)
def test_colours_are_exact_and_nearest(colour):
    exact = render.render(one_scene("circle", colour=colour, size=0.35), RES)[0]
    np.testing.assert_allclose(exact[RES // 2, RES // 2], render.COLOURS[colour], atol=1e-6)
    # With jitter the fill is still nearest to its palette colour.
    rng = np.random.default_rng(1)
    scenes = render.sample_scenes(rng, 200, shape="square", colour=colour, size_range=(0.3, 0.35))
    images = render.render(scenes, RES)
    palette = np.array([render.COLOURS[c] for c in render.COLOUR_NAMES])
    cx = np.clip((scenes.centre[:, 0] * RES).astype(int), 0, RES - 1)
    cy = np.clip((scenes.centre[:, 1] * RES).astype(int), 0, RES - 1)
    centre_pixels = images[np.arange(200), cy, cx]
    nearest = np.argmin(((centre_pixels[:, None] - palette[None]) ** 2).sum(-1), axis=1)
    assert (nearest == render.COLOUR_NAMES.index(colour)).all()
    assert np.abs(centre_pixels - palette[render.COLOUR_NAMES.index(colour)]).max() <= 0.04 + 1e-6


def test_backgrounds_are_distinct():
    rng = np.random.default_rng(2)
    stats = {}
    for bg in render.BACKGROUNDS:
        images = render.render(render.sample_scenes(rng, 100, background=bg, size_range=(0.22, 0.24)), RES)
        corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]].mean(-1)  # (N, 4) greys
        stats[bg] = (corners.mean(), (corners.max(1) - corners.min(1)).min(), (corners.max(1) - corners.min(1)).max())
        assert np.allclose(images[:, 0, 0, 0], images[:, 0, 0, 2])  # backgrounds are grey
    assert stats["light"][0] > 0.8 and stats["dark"][0] < 0.2 and 0.3 < stats["gradient"][0] < 0.7
    assert stats["light"][2] < 1e-6 and stats["dark"][2] < 1e-6  # plain
    assert stats["gradient"][1] > 0.1  # every gradient varies across the corners


def test_jitter_ranges_and_shape_stays_inside():
    rng = np.random.default_rng(4)
    scenes = render.sample_scenes(rng, 2000, max_rotation_deg=15.0)
    assert scenes.size.min() >= 0.22 and scenes.size.max() <= 0.36
    assert scenes.size.std() > 0.03 and scenes.centre.std(0).min() > 0.05
    reach = scenes.size + 0.05
    assert (scenes.centre >= reach[:, None] - 1e-6).all() and (scenes.centre <= 1 - reach[:, None] + 1e-6).all()
    rot = np.rad2deg(np.abs(scenes.rotation))
    for k, name in enumerate(render.SHAPES):
        limit = {"circle": 0, "ring": 0, "heart": 10, "diamond": 10}.get(name, 15)
        assert rot[scenes.shape == k].max() <= limit + 1e-4
        if limit:
            assert rot[scenes.shape == k].max() > 0.8 * limit
    # Each shape fits its bounding circle: the border pixels stay background.
    images = render.render(scenes[:500], RES)
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    assert np.abs(border - border.mean(-1, keepdims=True)).max() < 1e-5  # still grey


def test_position_jitter_narrows_the_centre_range():
    size_range, margin = (0.22, 0.36), 0.05
    centred = render.sample_scenes(np.random.default_rng(4), 200, position_jitter=0.0)
    np.testing.assert_allclose(centred.centre, 0.5, atol=1e-6)
    for jitter in (0.25, 1.0):
        scenes = render.sample_scenes(np.random.default_rng(4), 4000, position_jitter=jitter)
        room = jitter * (1 - 2 * (scenes.size + margin))[:, None]
        offset = np.abs(scenes.centre - 0.5)
        assert (offset <= room / 2 + 1e-6).all() and (offset > 0.9 * room / 2).any()  # the whole range is used
    # Other draws are unchanged: the same seed gives the same shapes, sizes and colours.
    a = render.sample_scenes(np.random.default_rng(5), 50, position_jitter=0.3)
    b = render.sample_scenes(np.random.default_rng(5), 50)
    np.testing.assert_array_equal(a.size, b.size)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    with pytest.raises(render.SceneError, match=r"position_jitter must be in \[0, 1\], found 1.5"):
        render.sample_scenes(np.random.default_rng(0), 2, size_range=size_range, position_jitter=1.5)


def test_all_labels_drawn_uniformly():
    scenes = render.sample_scenes(np.random.default_rng(5), 6000)
    for labels, names in ((scenes.shape, render.SHAPES), (scenes.colour, render.COLOUR_NAMES),
                          (scenes.background, render.BACKGROUNDS)):
        freq = np.bincount(labels, minlength=len(names)) / len(labels)
        assert np.abs(freq - 1 / len(names)).max() < 0.03


def test_scene_selection_and_names():
    scenes = render.sample_scenes(np.random.default_rng(0), 5, shape=["star", 0, "ring", "heart", 2])
    assert [scenes.names(i)["shape"] for i in range(5)] == ["star", "circle", "ring", "heart", "triangle"]
    assert len(scenes[1]) == 1 and len(scenes[1:4]) == 3 and len(scenes[np.array([0, 4])]) == 2
    both = render.concat_scenes([scenes[:2], scenes[2:]])
    np.testing.assert_array_equal(render.render(both), render.render(scenes))


def test_bad_scene_requests():
    rng = np.random.default_rng(0)
    with pytest.raises(render.SceneError, match="'hexagon'"):
        render.sample_scenes(rng, 2, shape="hexagon")
    with pytest.raises(render.SceneError, match="'teal'"):
        render.sample_scenes(rng, 2, colour=["red", "teal"])
    with pytest.raises(render.SceneError, match="background id 3"):
        render.sample_scenes(rng, 2, background=np.array([0, 3]))
    with pytest.raises(render.SceneError, match="expected 3 values, found 2"):
        render.sample_scenes(rng, 3, shape=["star", "ring"])
    with pytest.raises(render.SceneError, match="size_range"):
        render.sample_scenes(rng, 2, size_range=(0.3, 0.6))
    with pytest.raises(render.SceneError, match="unknown shape 'blob'"):
        render.shape_sdf("blob", np.zeros(1), np.zeros(1))


# --- captions --------------------------------------------------------------------

def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def test_surface_forms_never_use_canonical_words():
    canon = [f.canonical for f in captions.SHAPE_FORMS.values()]
    colour_words = {w for forms in captions.COLOUR_FORMS.values() for w in forms}
    all_forms = []
    assert tuple(captions.SHAPE_FORMS) == render.SHAPES
    for shape, forms in captions.SHAPE_FORMS.items():
        assert forms.canonical == shape
        synonyms = forms.train + forms.heldout
        assert len(synonyms) >= 3 and forms.train and forms.heldout
        assert not set(forms.train) & set(forms.heldout)
        for phrase in synonyms:
            for word in canon:  # no shape's canonical word, not even inside a word
                assert word not in phrase.lower(), (shape, phrase, word)
            assert not _words(phrase) & colour_words, phrase
        all_forms += synonyms
    assert len(all_forms) == len(set(all_forms))  # no phrase means two shapes
    assert captions.surface_forms("star", "train") == ("star",) + captions.SHAPE_FORMS["star"].train
    assert captions.surface_forms("star", "heldout") == captions.SHAPE_FORMS["star"].heldout
    assert "star" not in captions.surface_forms("star", "synonyms")


def test_fill_templates_and_articles():
    assert captions.fill("a {colour} {shape}", "circle", "orange") == "an orange circle"
    assert captions.fill("a picture of a {shape}", "circle", shape_word="orb") == "a picture of an orb"
    assert captions.fill("a {shape} on a {background} background", "star", background="dark",
                         shape_word="pentagram") == "a pentagram on a dark background"
    assert captions.fill("{shape} in {colour}", "heart", "red", colour_word="crimson") == "heart in crimson"


def test_bad_template_and_names_are_named():
    with pytest.raises(captions.CaptionError, match=r"\{hexagon\}"):
        captions.fill("a {hexagon}", "circle")
    with pytest.raises(captions.CaptionError, match="no \\{shape\\}"):
        captions.template_fields("a {colour} thing")
    with pytest.raises(captions.CaptionError, match="'hexagon'"):
        captions.fill("a {shape}", "hexagon")
    with pytest.raises(captions.CaptionError, match="'teal'"):
        captions.fill("a {colour} {shape}", "circle", "teal")
    with pytest.raises(captions.CaptionError, match="'pentagram' is not a surface form of 'circle'"):
        captions.fill("a {shape}", "circle", shape_word="pentagram")
    with pytest.raises(captions.CaptionError, match="needs a colour"):
        captions.fill("a {colour} {shape}", "circle")
    with pytest.raises(captions.CaptionError, match="'blurry'"):
        captions.surface_forms("star", "blurry")
    config = world_config()
    config.templates = ("a {shape}", "a {shade} {shape}")
    with pytest.raises(captions.CaptionError, match=r"\{shade\}"):
        captions.sample_captioned(np.random.default_rng(0), 4, config)


def _mentions(text, phrases):
    return [p for p in phrases if re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text)]


def test_captions_agree_with_their_scenes():
    scenes, texts = captions.sample_captioned(np.random.default_rng(0), 600)
    all_shape_forms = {s: captions.surface_forms(s) for s in render.SHAPES}
    seen_forms = set()
    for i, text in enumerate(texts):
        names = scenes.names(i)
        hits = {s for s, forms in all_shape_forms.items() if _mentions(text, forms)}
        assert hits == {names["shape"]}, (text, names)
        seen_forms.update(_mentions(text, all_shape_forms[names["shape"]]))
        for key, table in (("colour", captions.COLOUR_FORMS), ("background", captions.BACKGROUND_FORMS)):
            named = {k for k, forms in table.items() if _mentions(text, forms)}
            assert named <= {names[key]}, (text, names)
    # Every surface form, held-out synonyms included, occurs in the world's captions.
    assert seen_forms == {f for forms in all_shape_forms.values() for f in forms}


def test_colour_bias_when_caption_omits_colour():
    rng = np.random.default_rng(11)
    colour_words = {w for forms in captions.COLOUR_FORMS.values() for w in forms}
    for shape, expected in (("square", {"red": 0.85, "blue": 0.15}), ("circle", {"green": 0.8, "yellow": 0.2}),
                            ("star", {c: 1 / 6 for c in render.COLOUR_NAMES})):
        scenes, texts = captions.sample_captioned(rng, 5000, shape=shape)
        omitted = np.array([not (_words(t) & colour_words) for t in texts])
        assert 0.3 < omitted.mean() < 0.5  # 4 of the 10 default templates omit the colour
        freq = np.bincount(scenes.colour[omitted], minlength=6) / omitted.sum()
        want = np.array([expected.get(c, 0.0) for c in render.COLOUR_NAMES])
        assert np.abs(freq - want).max() < 0.03, (shape, freq)
        assert (freq[want == 0] == 0).all()
        # A caption that names the colour is unbiased.
        named = np.bincount(scenes.colour[~omitted], minlength=6) / (~omitted).sum()
        assert np.abs(named - 1 / 6).max() < 0.03
    np.testing.assert_allclose(captions.bias_matrix().sum(1), 1.0)


def test_independent_colour_naming_keeps_the_bias_out_of_the_captions():
    """With ``colour_naming="independent"`` a caption of a biased shape names a colour of the bias
    row's support as often as another of it (so CFG has no colour to amplify), the neutral
    captions keep their bias, and colours outside the support are always named."""
    config = world_config()
    config.colour_naming = "independent"
    colour_words = {w for forms in captions.COLOUR_FORMS.values() for w in forms}
    scenes, texts = captions.sample_captioned(np.random.default_rng(5), 12000, config, shape="square")
    omitted = np.array([not (_words(t) & colour_words) for t in texts])
    red, blue = (scenes.colour == render.COLOUR_NAMES.index(c) for c in ("red", "blue"))
    assert abs(omitted[red].mean() - omitted[blue].mean()) < 0.04  # about 0.57 each; "uniform": 0.77 vs 0.37
    assert not omitted[~(red | blue)].any()
    freq = np.bincount(scenes.colour[omitted], minlength=6) / omitted.sum()
    assert abs(freq[render.COLOUR_NAMES.index("red")] - 0.85) < 0.02
    # Named colours: half from the bias row (named_bias_share 0.5), half uniform over the other four.
    named = np.bincount(scenes.colour[~omitted], minlength=6) / (~omitted).sum()
    assert abs(named[render.COLOUR_NAMES.index("red")] - 0.425) < 0.02
    assert abs(named[render.COLOUR_NAMES.index("green")] - 0.125) < 0.02
    # A shape without a bias row stays uniform; the default rule's draws are unchanged by the option.
    star, _ = captions.sample_captioned(np.random.default_rng(5), 6000, config, shape="star")
    assert np.abs(np.bincount(star.colour, minlength=6) / 6000 - 1 / 6).max() < 0.02
    legacy = world_config()
    legacy.named_bias_share = 0.9
    a, _ = captions.sample_captioned(np.random.default_rng(1), 50, legacy)
    b, _ = captions.sample_captioned(np.random.default_rng(1), 50)
    np.testing.assert_array_equal(a.colour, b.colour)
    for field, value, message in (("colour_naming", "skewed", "config.colour_naming = 'skewed'"),
                                  ("named_bias_share", 1.5, "config.named_bias_share = 1.5")):
        bad = world_config()
        bad.colour_naming = "independent"
        bad[field] = value
        with pytest.raises(captions.CaptionError, match=re.escape(message)):
            captions.sample_captioned(np.random.default_rng(0), 4, bad)


def test_bias_is_configurable_and_checked():
    config = world_config()
    config.bias.square = {"blue": 1.0}
    config.templates = ("a {shape}",)
    scenes, _ = captions.sample_captioned(np.random.default_rng(0), 300, config, shape="square")
    assert (scenes.colour == render.COLOUR_NAMES.index("blue")).all()
    bad = world_config()
    bad.bias.square.red = 0.5
    with pytest.raises(captions.CaptionError, match="config.bias.square sums to 0.650000"):
        captions.bias_matrix(bad)
    bad = world_config()
    bad.bias.circle = {"teal": 1.0}
    with pytest.raises(captions.CaptionError, match="'teal'"):
        captions.bias_matrix(bad)
    bad = world_config()
    bad.bias.hexagon = {"red": 1.0}
    with pytest.raises(captions.CaptionError, match="'hexagon'"):
        captions.bias_matrix(bad)


def test_surface_form_split_in_captions():
    config = world_config()
    config.shape_forms = "heldout"
    config.colour_synonyms = False
    scenes, texts = captions.sample_captioned(np.random.default_rng(3), 300, config)
    for i, text in enumerate(texts):
        shape = scenes.names(i)["shape"]
        assert _mentions(text, captions.surface_forms(shape, "heldout"))
        assert not _mentions(text, captions.surface_forms(shape, "train"))
        assert not _words(text) & {"crimson", "scarlet", "emerald", "azure", "golden", "violet", "amber"}


def test_sample_scene_and_vocabulary():
    scene, text = captions.sample_scene(np.random.default_rng(0))
    assert len(scene) == 1 and isinstance(text, str)
    vocab = captions.vocabulary()
    assert list(vocab) == sorted(set(vocab))
    _, texts = captions.sample_captioned(np.random.default_rng(1), 2000)
    used = {w for t in texts for w in t.split()}
    assert used <= set(vocab)
    assert {"pentagram", "an", "crimson", "background", "halo"} <= set(vocab)


# --- batches -----------------------------------------------------------------------

def test_batches_are_pure_functions_of_seed_and_step():
    for build in (data.judge_batch, data.caption_batch, data.pair_batch):
        a, b = build(3, 17, 16), build(3, 17, 16)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        other = build(3, 18, 16)
        first = "x0" if "x0" in a else "image"
        assert np.abs(a[first] - other[first]).max() > 0.5
    # Streams are independent: the judge and pair batches of one (seed, step) differ.
    assert np.abs(data.judge_batch(3, 17, 16)["image"] - data.pair_batch(3, 17, 16)["x0"]).max() > 0.5
    with pytest.raises(ValueError, match="step=-1"):
        data.judge_batch(0, -1, 4)


def test_judge_and_caption_batches():
    batch = data.judge_batch(0, 0, 32)
    assert batch["image"].shape == (32, RES, RES, 3) and batch["image"].dtype == np.float32
    assert all(batch[k].dtype == np.int32 and batch[k].shape == (32,) for k in ("shape", "colour", "background"))
    cap = data.caption_batch(0, 0, 64)
    assert cap["caption"].shape == (64,) and cap["caption"].dtype.kind == "U"
    colour_words = {w for forms in captions.COLOUR_FORMS.values() for w in forms}
    for text, named in zip(cap["caption"], cap["colour_named"]):
        assert named == bool(_words(str(text)) & colour_words)
    # Images and labels belong together: the background label predicts the corners.
    assert cap["image"].shape == (64, RES, RES, 3)
    corner = cap["image"][:, 0, 0].mean(-1)
    light, dark = render.BACKGROUNDS.index("light"), render.BACKGROUNDS.index("dark")
    assert (corner[cap["background"] == light] > 0.8).all() and (corner[cap["background"] == dark] < 0.2).all()


def test_low_high_resolution_pairs():
    batch = data.pair_batch(5, 2, 8)
    x0, x1, low = batch["x0"], batch["x1"], batch["lowres"]
    assert x0.shape == x1.shape == (8, RES, RES, 3) and low.shape == (8, 8, 8, 3)
    # Independent 4x4 average pooling, by loops.
    want = np.zeros_like(low)
    for i in range(8):
        for j in range(8):
            want[:, i, j] = x0[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean(axis=(1, 2))
    np.testing.assert_allclose(low, want, atol=1e-6)
    # x1 is the nearest-neighbour upsampling: constant 4x4 blocks equal to lowres.
    for di in range(4):
        for dj in range(4):
            np.testing.assert_array_equal(x1[:, di::4, dj::4], low)
    with pytest.raises(ValueError, match="not divisible"):
        data.downsample(np.zeros((1, 30, 30, 3)), 4)
