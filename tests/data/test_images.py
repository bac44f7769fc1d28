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
