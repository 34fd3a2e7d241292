"""The wheel ships every ShapesWorld asset: a non-editable install copies only the files that
``setup.py``'s package_data patterns match (the tokenizer folder was once left out)."""
import fnmatch
import os
from unittest import mock

import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_kwargs() -> dict:
    captured = {}
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # setup.py reads README.md relative to itself
        with mock.patch.object(setuptools, "setup", lambda **kw: captured.update(kw)):
            exec(compile(open(os.path.join(ROOT, "setup.py")).read(), "setup.py", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(cwd)
    return captured


def test_package_data_covers_every_asset_file():
    patterns = _setup_kwargs()["package_data"]["jharm.shapesworld"]
    base = os.path.join(ROOT, "jharm", "shapesworld")
    files = [os.path.relpath(os.path.join(d, f), base)
             for d, _, names in os.walk(os.path.join(base, "assets")) for f in names if "__pycache__" not in d]
    assert "assets/tokenizer/vocab.json" in files and "assets/manifest.json" in files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/") for p in patterns)]
    assert not missing, f"not shipped by package_data {patterns}: {missing}"
