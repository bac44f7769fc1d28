from pathlib import Path

import numpy as np
import pytest

from steelseg.data import catalog, synth
from steelseg.data.images import in_channels, read_stack
from steelseg.errors import SteelsegError


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "d"
    return synth.write_dataset(out, 6, height=32, width=160, seed=4, modalities=["visible", "ir"])


def test_modalities_stack_in_the_configured_order(fused_dir):
    table, _ = catalog.scan(fused_dir, modalities=["visible", "ir"])
    row = table.iloc[0]
    stack = read_stack([row["path"], row["path_ir"]])
    assert stack.shape == (32, 160, in_channels(["visible", "ir"])) == (32, 160, 4)
    visible = read_stack([row["path"]])
    np.testing.assert_array_equal(stack[:, :, :3], visible)
    assert not np.array_equal(stack[:, :, 3], stack[:, :, 0])


def test_missing_modality_file_is_a_clear_error(fused_dir, tmp_path):
    table, _ = catalog.scan(fused_dir, modalities=["visible", "ir"])
    missing = tmp_path / "train_images_ir" / table["image_id"][0]
    with pytest.raises(SteelsegError, match=f"{missing}: no such image"):
        read_stack([table["path"][0], str(missing)])


def test_catalog_reports_a_missing_modality_file(fused_dir, tmp_path):
    import shutil

    copy = shutil.copytree(fused_dir, tmp_path / "copy")
    victim = sorted((copy / "train_images_ir").iterdir())[0]
    victim.unlink()
    _, problems = catalog.scan(copy, modalities=["visible", "ir"])
    assert [str(p) for p in problems] == [f"train_images_ir/{victim.name}: missing (modality 'ir')"]
    with pytest.raises(SteelsegError, match="no such folder for modality 'uv'"):
        catalog.scan(copy, modalities=["visible", "uv"])


REAL = Path(__file__).parents[1] / "real"


def test_real_severstal_images_are_found_grey_and_read_as_their_one_channel_exactly():
    table = catalog.load(REAL)
    assert table["grey"].tolist() == [True] * len(table)
    for path in table["path"]:
        rgb, grey = read_stack([path]), read_stack([path], grey=True)
        assert rgb.shape == (256, 1600, 3) and grey.shape == (256, 1600, 1)
        np.testing.assert_array_equal(grey[:, :, 0], rgb[:, :, 0])  # the luma is every channel


def test_grey_fused_stack_keeps_its_extra_channels(fused_dir):
    table, _ = catalog.scan(fused_dir, modalities=["visible", "ir"])
    row = table.iloc[0]
    rgb = read_stack([row["path"], row["path_ir"]])
    grey = read_stack([row["path"], row["path_ir"]], grey=True)
    assert grey.shape == (32, 160, 2)
    np.testing.assert_array_equal(grey, rgb[:, :, [0, 3]])


def test_a_colour_image_is_not_grey_and_a_header_only_check_finds_nothing_grey(tmp_path):
    import shutil

    from PIL import Image

    copy = shutil.copytree(REAL, tmp_path / "data")
    victim = sorted((copy / "train_images").iterdir())[0]
    pixels = np.asarray(Image.open(victim).convert("RGB")).copy()
    pixels[:8, :8, 0] = 255  # a red corner
    Image.fromarray(pixels).save(victim, quality=95)
    table = catalog.load(copy)
    assert dict(zip(table["image_id"], table["grey"])) == {
        victim.name: False, **{p.name: True for p in (copy / "train_images").iterdir()
                               if p != victim}}  # fmt: skip
    assert not catalog.load(copy, decode_images=False)["grey"].any()
