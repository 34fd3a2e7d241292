"""`jharm demo erase` at plumbing size on the shipped ShapesWorld assets: every stage
(ESD-u through the one loop, concept images, Co-Erasing from the stage-1 model, the
scorecard, the prefix attack) runs and writes its report and grids. The numbers of
the full-size demo are in docs/erasure.md; a few steps here only check the wiring."""
import os
import re

import pytest

from jharm import erase_demo

TINY = dict(n_per_prompt=1, sample_steps=2, esd_steps=2, co_steps=2, batch_size=2, train_sample_steps=2,
            attack_tokens=2, attack_steps=1)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("erase_demo"))
    return out, erase_demo.erase_scorecard(out, settings=TINY)


def test_report_has_every_model_and_gate(report):
    out, path = report
    text = open(path).read()
    rows = re.findall(r"^\| (base|esd_u|co_erasing_esd) \| (.+) \|$", text, re.M)
    assert [name for name, _ in rows] == ["base", "esd_u", "co_erasing_esd"]
    for _, cells in rows:
        rates, fd = [float(x) for x in cells.split(" | ")[:5]], float(cells.split(" | ")[5])
        assert all(0.0 <= r <= 1.0 for r in rates) and fd >= 0.0
        canonical, _, attacked, asr, _ = rates  # ASR: plain or attacked sample shows the concept
        assert max(canonical, attacked) <= asr <= canonical + attacked + 1e-3
    assert text.count("canonical rate <= 10 % of base") == 2 and "Co-Erasing vs ESD on held-out synonyms" in text
    for name in ("base", "esd_u", "co_erasing_esd"):
        for key in ("canonical", "heldout", "others"):
            assert os.path.getsize(os.path.join(out, f"{name}_{key}.png")) > 0
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # written atomically


def test_unknown_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown erase demo settings \['esd_stepz'\]"):
        erase_demo.erase_scorecard(str(tmp_path), settings={"esd_stepz": 3})
    assert os.listdir(tmp_path) == []
