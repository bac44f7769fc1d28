import hashlib

import numpy as np
import pandas as pd
import pytest

from steelseg.data import catalog, rle, synth
from steelseg.domain import HAS_COLUMNS
from steelseg.errors import SteelsegError


def digest(folder):
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() for p in files
    }


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = synth.write_dataset(tmp_path / "a", 12, height=32, width=160, seed=5, processes=2)
    b = synth.write_dataset(tmp_path / "b", 12, height=32, width=160, seed=5, processes=1)
    c = synth.write_dataset(tmp_path / "c", 12, height=32, width=160, seed=6, processes=2)
    assert digest(a) == digest(b)
    assert set(digest(a)).isdisjoint(set(digest(c)) - {"train.csv"})
    from PIL import Image

    def pixels(folder):
        files = sorted((folder / "train_images").glob("*.jpg"))
        return np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in files])

    # other pixels, not only other names: no image of seed 6 repeats one of seed 5
    first, other = pixels(a), pixels(c)
    differences = np.abs(first[:, None] - other[None]).mean(axis=(2, 3, 4))
    assert differences.min() > 1.0


def test_layout_is_the_real_one(synth_dir):
    assert (synth_dir / "train.csv").read_text().splitlines()[0] == "ImageId,ClassId,EncodedPixels"
    images = sorted((synth_dir / "train_images").glob("*.jpg"))
    assert len(images) == 60
    assert all(len(p.stem) == 9 and int(p.stem, 16) >= 0 for p in images)
    from PIL import Image

    rgb = np.array(Image.open(images[0]))
    assert rgb.shape == (64, 320, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_statistics_follow_the_real_data():
    spec = synth.SynthSpec(height=64, width=320, seed=11)
    n = 600
    masks = np.zeros(4)
    areas = [[] for _ in range(4)]
    defect_free = overlaps = 0
    brightness = []
    for i in range(n):
        images, defects = synth.make_image(spec, i)
        brightness.append(images["visible"].mean())
        defect_free += not defects
        total = sum(d.mask.astype(int) for d in defects) if defects else np.zeros(1)
        overlaps += int((total > 1).any())
        for d in defects:
            masks[d.class_id - 1] += 1
            areas[d.class_id - 1].append(d.mask.mean())
    share = masks / masks.sum()
    assert defect_free / n == pytest.approx(0.47, abs=0.05)
    np.testing.assert_allclose(share, [0.13, 0.03, 0.73, 0.11], atol=0.04)
    mean_area = [np.mean(a) for a in areas]
    np.testing.assert_allclose(mean_area, [0.011, 0.008, 0.062, 0.084], rtol=0.5)
    assert mean_area[3] > mean_area[2] > mean_area[0] > mean_area[1] * 0.8
    assert overlaps == 0
    assert np.percentile(brightness, 10) < 60 and np.percentile(brightness, 90) > 130


def test_written_masks_match_make_image(synth_dir):
    table, _ = catalog.scan(synth_dir)
    spec = synth.SynthSpec(height=64, width=320, seed=7)
    for index in range(10):
        name = synth.image_id(7, index)
        row = table.set_index("image_id").loc[name]
        _, defects = synth.make_image(spec, index)
        for d in defects:
            np.testing.assert_array_equal(rle.decode(row[f"rle_{d.class_id}"], 64, 320), d.mask)
        assert sum(row[HAS_COLUMNS]) == len(defects)


def test_second_modality_sees_defects_the_visible_one_hides(tmp_path):
    out = synth.write_dataset(
        tmp_path / "d", 30, height=32, width=160, seed=2, modalities=["visible", "ir"]
    )
    table, problems = catalog.scan(out, modalities=["visible", "ir"])
    assert problems == [] and table["path_ir"].str.contains("train_images_ir").all()
    spec = synth.SynthSpec(height=64, width=320, seed=3, modalities=("visible", "ir"))
    hidden = shown = 0
    for i in range(300):
        images, defects = synth.make_image(spec, i)
        for d in defects:
            inside, outside = d.mask == 1, d.mask == 0
            heat_contrast = images["ir"][inside].mean() - images["ir"][outside].mean()
            assert heat_contrast > 10
            hidden += d.hidden
            shown += not d.hidden
    assert 0.25 < hidden / (hidden + shown) < 0.45


def test_bad_arguments_are_errors(tmp_path, synth_dir):
    with pytest.raises(
        SteelsegError, match="not an empty folder; synth writes into a new or empty"
    ):
        synth.write_dataset(synth_dir, 1, height=32, width=160)
    with pytest.raises(SteelsegError, match="the first must be 'visible'"):
        synth.write_dataset(tmp_path / "x", 1, modalities=["xray"])
    with pytest.raises(SteelsegError, match="too small"):
        synth.write_dataset(tmp_path / "x", 1, height=8, width=8)
    assert not (tmp_path / "x" / "train.csv").exists()


def test_csv_is_sorted_by_image_then_class(synth_dir):
    rows = pd.read_csv(synth_dir / "train.csv")
    assert list(zip(rows.ImageId, rows.ClassId)) == sorted(zip(rows.ImageId, rows.ClassId))
