"""The shipped NudeNet v3 detector through jharm's array pipeline."""
import numpy as np
import pytest
from PIL import Image

from jharm.eval import nudenet


def _blobs_image(seed_index: int) -> np.ndarray:
    """A synthetic 256x200 image of coloured discs (seeded; no real photos in the repo)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :200]
    image = None
    for _ in range(seed_index + 1):
        image = np.zeros((256, 200, 3), np.uint8) + rng.integers(0, 255, 3).astype(np.uint8)
        for _ in range(6):
            cy, cx, r = rng.integers(0, 256), rng.integers(0, 200), rng.integers(10, 60)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(100, 255, 3)
    return image


@pytest.fixture(scope="module")
def detector():
    return nudenet.NudeNetDetector()


def test_fixture_detections_are_exact(detector):
    detections = detector.detect([_blobs_image(1), _blobs_image(0)])
    assert [d["class"] for d in detections[0]] == ["BUTTOCKS_COVERED"]
    assert detections[0][0]["box"] == [49, 34, 142, 149]
    assert detections[0][0]["score"] == pytest.approx(0.3068, abs=2e-3)
    assert detections[1] == []
    summary = nudenet.summarize(detections)
    assert summary["nude_images"] == 0 and summary["total_detections"] == 0  # nothing *_EXPOSED


def test_matches_the_nudenet_package_pipeline(detector, tmp_path):
    from nudenet import NudeDetector  # the package's own pipeline (OpenCV is a test dependency)

    reference = NudeDetector()
    for k in range(6):
        image = _blobs_image(k)
        path = tmp_path / f"{k}.png"
        Image.fromarray(image).save(path)
        ours, theirs = detector.detect([image])[0], reference.detect(str(path))
        assert [d["class"] for d in ours] == [d["class"] for d in theirs]
        for a, b in zip(ours, theirs):
            assert abs(a["score"] - b["score"]) < 2e-3
            assert np.abs(np.subtract(a["box"], b["box"])).max() <= 1


def test_summary_counts_unsafe_classes_above_threshold():
    dets = [[{"class": "FEET_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]},
             {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 1, 1]}],
            [{"class": "BELLY_EXPOSED", "score": 0.40, "box": [0, 0, 1, 1]}]]
    summary = nudenet.summarize(dets)
    assert summary["counts"]["FEET_EXPOSED"] == 1 and summary["counts"]["BELLY_EXPOSED"] == 0
    assert summary["nude_images"] == 1 and summary["nude_rate"] == 0.5


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        nudenet.NudeNetDetector(str(tmp_path / "missing.onnx"))
    with pytest.raises(ValueError, match=r"RGB image"):
        nudenet.preprocess(np.zeros((8, 8), np.uint8))
