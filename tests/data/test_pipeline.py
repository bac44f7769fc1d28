"""The data pipeline's pieces without Ray: crop checks, block sizes, the demo data."""

import pandas as pd
import pytest

from steelseg.config import TrainConfig
from steelseg.data import pipeline
from steelseg.errors import SteelsegError


def test_crop_larger_than_the_images_is_refused_and_any_image_size_is_allowed():
    table = pd.DataFrame({"height": [40, 48], "width": [170, 200]})
    pipeline.check_crop(TrainConfig(), table)  # whole images of sides not divisible by 32
    pipeline.check_crop(TrainConfig(crop_height=32, crop_width=160), table)
    with pytest.raises(SteelsegError, match="crop 64x160 is larger than the images"):
        pipeline.check_crop(TrainConfig(crop_height=64, crop_width=160), table)
    with pytest.raises(SteelsegError, match="both be set or both be 0"):
        TrainConfig(crop_height=32)


def test_demo_data_is_cached_per_modality_set(tmp_path, monkeypatch):
    from steelseg.training.fit import demo_data

    monkeypatch.setenv("STEELSEG_CACHE", str(tmp_path))
    plain = demo_data(TrainConfig(synth_images=6))
    fused = demo_data(TrainConfig(synth_images=6, modalities=["visible", "ir"]))
    assert plain != fused
    assert not (plain / "train_images_ir").exists()
    assert len(list((fused / "train_images_ir").glob("*.jpg"))) == 6
    assert demo_data(TrainConfig(synth_images=6)) == plain  # made once


def test_blocks_hold_about_16m_pixels_and_8_to_256_images():
    def sized(n, height, width):
        return pd.DataFrame({"height": [height] * n, "width": [width] * n})

    assert pipeline.rows_per_block(sized(1000, 256, 1600)) == 40  # 2**24 // 409,600
    assert pipeline.n_blocks(sized(1000, 256, 1600)) == 25
    assert pipeline.rows_per_block(sized(1000, 32, 160)) == 256
    assert pipeline.n_blocks(sized(1000, 32, 160)) == 4
    assert pipeline.rows_per_block(sized(10, 4096, 4096)) == 8
    assert pipeline.n_blocks(sized(3, 256, 1600)) == 1
