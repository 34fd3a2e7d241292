"""The offline CLIP tokenizer vs open_clip's and transformers' tokenizers."""
import importlib.util
import os
import random

import numpy as np
import pytest

from jharm import tokenizer as tok

BASE_PROMPTS = [
    "", " ", "   \t\n ", "a photo of an astronaut riding a horse on mars",
    "A Photo Of A CAT", "photo portrait of a female doctor, a person", "nude", "a red square!!!",
    "hello,world", "don't stop believin'", "it's we're they've I'm you'll he'd", "3.14159 and 42 apples",
    "1234567890", "e-mail: someone@example.com", "C++ / C# / F#", "100% cotton, 50$ each",
    "café crème brûlée", "naïve résumé", "日本語のテキスト", "中文提示词", "Привет мир", "مرحبا بالعالم",
    "emoji 🚀🔥 party 🎉", "👩‍👩‍👧‍👦 family", "tabs\tand\nnewlines", "multiple     spaces   here",
    "quotes \"double\" and 'single'", "(parentheses) [brackets] {braces}", "a,b;c:d.e!f?g", "~`@#$%^&*_+=|\\<>",
    "ALL CAPS SHOUTING", "MiXeD cAsE", "hyphen-ated and under_scored", "ellipsis... and — dashes –",
    "trailing space ", " leading space", "ünïcödé äccents", "Zürich, São Paulo, Kraków", "ﬁ ligature ﬂ",
    "½ ¼ ¾ fractions", "x² + y³ = z⁴", "Ⅻ roman", "super long word pneumonoultramicroscopicsilicovolcanoconiosis",
    "masterpiece, best quality, ultra-detailed, 8k, trending on artstation, by greg rutkowski",
    "<|endoftext|>", "a painting in the style of van gogh", "a dog's toy", "rock'n'roll",
]
# Where the references' text cleaning differs (ftfy / HTML unescaping): open_clip only.
OPENCLIP_ONLY = ["fish &amp; chips", "&lt;tag&gt; &quot;quoted&quot;", "Ã©tÃ© mojibake", "&amp;amp; double"]

WORDS = ["a", "photo", "of", "the", "cat", "dog", "in", "style", "painting", "red", "blue", "square",
         "star", "nude", "woman", "man", "doctor", "CEO", "beautiful", "landscape", "city", "night",
         "4k", "HDR", "by", "artist", "é", "ß", "🙂", "!", "?", ",", "'s", "99", "-", "x"]


def _prompts():
    rng = random.Random(0)
    prompts = list(BASE_PROMPTS)
    while len(prompts) < 230:
        n = rng.choice([1, 3, 8, 20, 60])
        sep = rng.choice([" ", ", ", " ", "  "])
        prompts.append(sep.join(rng.choice(WORDS) for _ in range(n)))
    prompts.append(" ".join(["very long prompt"] * 60))  # > 77 tokens
    return prompts


@pytest.fixture(scope="module")
def open_clip_ref():
    """open_clip's SimpleTokenizer loaded from its file (the package needs torchvision)."""
    path = os.path.join(os.path.dirname(tok.open_clip_bpe_path()), "tokenizer.py")
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(tok.open_clip_bpe_path())


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    tok.CLIPTokenizer.default().save_pretrained(folder)
    return folder


def test_default_matches_open_clip(open_clip_ref):
    ours = tok.CLIPTokenizer.default(pad="zero")
    prompts = _prompts() + OPENCLIP_ONLY
    assert len(prompts) >= 200
    expected = open_clip_ref(prompts, context_length=77).numpy()
    np.testing.assert_array_equal(ours(prompts), expected)


def test_hf_folder_matches_transformers(hf_folder):
    from transformers import CLIPTokenizer as HFTokenizer

    ours = tok.CLIPTokenizer.from_pretrained(hf_folder)
    ref = HFTokenizer.from_pretrained(hf_folder)
    prompts = _prompts()
    expected = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ours(prompts), expected)
    assert ours.pad_token_id == 49407  # SD 1.x pads with EOS


def test_sd2_style_folder_pads_with_zero(hf_folder, tmp_path):
    import json
    import shutil

    from transformers import CLIPTokenizer as HFTokenizer

    folder = tmp_path / "sd2"
    shutil.copytree(hf_folder, folder)
    cfg = json.loads((folder / "special_tokens_map.json").read_text())
    cfg["pad_token"] = "!"
    (folder / "special_tokens_map.json").write_text(json.dumps(cfg))
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    tcfg["pad_token"] = "!"
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    ours = tok.CLIPTokenizer.from_pretrained(str(folder))
    ref = HFTokenizer.from_pretrained(str(folder))
    prompts = ["a cat", "", "a photo of a dog in the snow"]
    expected = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ours(prompts), expected)
    assert ours.pad_token_id == 0


def test_truncation_keeps_eos_and_positions():
    t = tok.CLIPTokenizer.default()
    ids = t(" ".join(["word"] * 200))
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    short = t(["a cat", ""])
    np.testing.assert_array_equal(t.eos_positions(short), [3, 1])
    assert t.decode(short[0]) == "a cat"


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tok.CLIPTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="pad must be"):
        tok.CLIPTokenizer.from_bpe_file(tok.open_clip_bpe_path(), pad="left")


def test_byte_pair_encode_merges_every_occurrence_of_the_best_pair():
    ranks = {("a", "b"): 0, ("ab", "ab"): 1, ("b", "a"): 2}
    assert tok.byte_pair_encode(list("abab"), ranks) == ["abab"]  # both "ab" first, then "ab"+"ab"
    assert tok.byte_pair_encode(list("bab"), ranks) == ["b", "ab"]
    assert tok.byte_pair_encode(["x"], ranks) == ["x"]
