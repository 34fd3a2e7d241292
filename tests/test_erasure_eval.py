"""`jharm eval` on a tiny local SD folder: Co-Erasing+SLD generation, JSONL + summary, bad input."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from jharm import cli
from jharm.config import ConfigError
from jharm.erase import read_prompt_csv
from test_pipeline import sd_folder  # noqa: F401  (module fixture: tiny SD folder with image encoder + ip.bin)


def write_csv(path, text):
    path.write_text(text)
    return str(path)


def test_prompt_csv_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing column"):
        read_prompt_csv(write_csv(tmp_path / "a.csv", "prompt,seed\na cat,1\n"))
    with pytest.raises(ConfigError, match=r"b.csv:3: evaluation_seed"):
        read_prompt_csv(write_csv(tmp_path / "b.csv", "prompt,evaluation_seed\na cat,1\na dog,x\n"))
    with pytest.raises(ConfigError, match="evaluation_seed"):
        read_prompt_csv(write_csv(tmp_path / "c.csv", "prompt,evaluation_seed\na cat,-3\n"))
    with pytest.raises(ConfigError, match="no prompt rows"):
        read_prompt_csv(write_csv(tmp_path / "d.csv", "prompt,evaluation_seed\n"))
    rows = read_prompt_csv(write_csv(tmp_path / "e.csv", "prompt,evaluation_seed,categories\na cat,7.0,x\n"))
    assert rows == [{"prompt": "a cat", "evaluation_seed": 7, "categories": "x"}]


def test_prompt_that_tokenizes_to_nothing():
    from jharm.tokenizer import CLIPTokenizer
    from jharm.train.tasks.erasure import encode_prompts

    tokenizer = CLIPTokenizer.default()  # open_clip cleaning: "&nbsp;" unescapes to whitespace
    with pytest.raises(ConfigError, match="tokenizes to nothing"):
        encode_prompts(tokenizer, None, None, ["a cat", "&nbsp;"])


def test_eval_co_erasing_sld_and_bad_input(sd_folder, tmp_path, capsys):  # noqa: F811
    root = sd_folder[0]
    images = tmp_path / "concept"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / f"{i}.png")
    csv_path = write_csv(tmp_path / "p.csv", "prompt,evaluation_seed,case_number\na red square,3,0\n"
                                             "a blue circle,5,1\na photo of a cat,3,2\n")
    base = ["eval", "--model", str(root), "--prompts", csv_path, "--steps", "2", "--resolution", "16",
            "--batch-size", "2"]

    # Bad input: clear errors, nothing written.
    bad = write_csv(tmp_path / "bad.csv", "prompt,seed\na cat,1\n")
    assert cli.main(["eval", "--model", str(root), "--prompts", bad, "--out", str(tmp_path / "x")]) == 2
    assert cli.main(base + ["--out", str(tmp_path / "y"), "--sld", "max", "--concept-images", str(images),
                            "--ip-adapter", str(tmp_path / "missing.bin")]) == 2
    assert cli.main(base + ["--out", str(tmp_path / "z"), "--concept-images", str(images)]) == 2
    err = capsys.readouterr().err
    assert "missing column" in err and "missing.bin" in err and "needs --sld" in err
    assert not any(os.path.exists(tmp_path / d) for d in "xyz")

    out = tmp_path / "out"
    args = base + ["--out", str(out), "--sld", "max", "--ip-adapter", str(root / "ip.bin"),
                   "--concept-images", str(images), "--concept", "nudity"]
    assert cli.main(args) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["case_number"] for r in records] == ["0", "1", "2"]
    assert all(r["evaluation_seed"] in (3, 5) and isinstance(r["detections"], list) for r in records)
    pngs = [np.asarray(Image.open(out / r["image"])) for r in records]
    assert all(p.shape == (16, 16, 3) for p in pngs)
    # Same seed, different prompt -> different image; the images are not constant.
    assert np.abs(pngs[0].astype(int) - pngs[2].astype(int)).max() > 0 and pngs[0].std() > 0
    summary = (out / "summary.md").read_text()
    assert "| num_images | 3 |" in summary and "| co_erasing_sld | true |" in summary
    assert "nude_rate" in summary  # the NudeNet summary columns
    # A finished evaluation is not silently overwritten.
    assert cli.main(args) == 2
