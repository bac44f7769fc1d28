"""The data pipeline's pieces without Ray: crop checks, block sizes, the demo data."""

from pathlib import Path

import numpy as np
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


def test_a_task_reads_seconds_of_images_in_whole_blocks_of_whole_batches():
    cut = pipeline.blocks  # (rows, pixels read, bytes out a row, batch size, cpus)
    crop = 256 * 800 * 2  # a grey 256x800 crop and its mask
    # 2**29 // 409,600 = 1,310 a task: 10 tasks of 1,257 -> 1,264 in whole batches; a block is
    # at most 2**25 // (8 * crop) = 10 batches, so 16 blocks of 80
    assert cut(12_568, 256 * 1600, crop, 8) == (1280, 80, 80 * crop)
    # 2 CPUs, 4,000 images: 4 tasks of 1,000 -> 1,040
    assert cut(4000, 256 * 1600, crop, 8, cpus=2) == (1040, 80, 80 * crop)
    # 8 CPUs, 4,000 images: 8 tasks (one a CPU) of 500 -> 504, 7 blocks of 72
    assert cut(4000, 256 * 1600, crop, 8, cpus=8) == (504, 72, 72 * crop)
    # 96 CPUs, 1,256 images: not 96 tasks of 13 images but 4 of 314 -> 320, a quarter of 1,310
    assert cut(1256, 256 * 1600, crop, 8, cpus=96) == (320, 80, 80 * crop)
    # an epoch of 3 images, or none: one batch
    assert cut(3, 256 * 1600, crop, 8) == (8, 8, 8 * crop)
    assert cut(0, 256 * 1600, crop, 8).task == 8
    # images larger than a block: a batch is a block, a task 2**29 // 2**24 = 32 rows
    assert cut(100, 4096 * 4096, 4096 * 4096 * 4, 8) == (32, 8, 8 * 4096 * 4096 * 4)
    # small whole images: 1,000 of them are less than a task's pixels, one task of 1,000
    assert cut(1000, 32 * 160, 32 * 160 * 2, 8) == (1000, 1000, 1000 * 32 * 160 * 2)


def test_a_block_carries_the_bytes_the_consumer_receives():
    table = pd.DataFrame({"height": [256] * 100, "width": [1600] * 100})
    config = TrainConfig(crop_height=256, crop_width=800, batch_size=8)
    grey = pipeline.train_blocks(table, config, grey=True, cpus=1)
    # 100 images: one task of 100 -> 104, in 2 blocks of at most 80: 52 -> 56
    assert grey == (112, 56, 56 * 256 * 800 * 2)
    # RGB: 3 bytes an image pixel and the mask's; no crop: whole images
    rgb = pipeline.train_blocks(table, config, grey=False, cpus=1)
    assert rgb.block_bytes == rgb.block * 256 * 800 * 4
    whole = pipeline.train_blocks(table, TrainConfig(batch_size=8), grey=True, cpus=1)
    assert whole.block_bytes == whole.block * 256 * 1600 * 2
    # visible and infrared: 3 + 1 channels, or 1 + 1 read grey, and the mask's byte
    fused = TrainConfig(crop_height=256, crop_width=800, modalities=["visible", "ir"])
    rgb_ir = pipeline.train_blocks(table, fused, grey=False, cpus=1)
    assert rgb_ir.block_bytes == rgb_ir.block * 256 * 800 * 5
    grey_ir = pipeline.train_blocks(table, fused, grey=True, cpus=1)
    assert grey_ir.block_bytes == grey_ir.block * 256 * 800 * 3
    # a rank with no rows (a share of 0) is cut too
    assert pipeline.train_blocks(table.iloc[:0], config, grey=True, cpus=1).task == 8


def table_of(n: int) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"{i:04d}.jpg" for i in range(n)], "height": 32,
                         "width": 160})  # fmt: skip


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_epoch_every_rank_reads_an_equal_share_each_image_at_most_once(world):
    table = table_of(50)
    for epoch in (0, 1):
        shares = [pipeline.train_rows(table, 7, epoch, rank, world) for rank in range(world)]
        seen = pd.concat(shares)["image_id"]
        assert {len(s) for s in shares} == {50 // world}
        assert seen.is_unique and len(seen) == 50 - 50 % world
    epoch_0 = pd.concat(pipeline.train_rows(table, 7, 0, r, world) for r in range(world))
    epoch_1 = pd.concat(pipeline.train_rows(table, 7, 1, r, world) for r in range(world))
    assert epoch_0["image_id"].tolist() != epoch_1["image_id"].tolist()


def test_an_epochs_rows_depend_on_the_seed_and_epoch_alone_as_a_resume_needs():
    table = table_of(40)
    # a run's epoch 3, and the same epoch computed by a run resumed there: nothing else counts
    run = [pipeline.train_rows(table, 7, e, 1, 2) for e in range(4)][3]
    resumed = pipeline.train_rows(table, 7, 3, 1, 2)
    pd.testing.assert_frame_equal(run, resumed)
    assert not run.equals(pipeline.train_rows(table, 8, 3, 1, 2))
    # the rows keep their place in the table: it seeds their augmentation
    assert run.index.tolist() == [int(i[:4]) for i in run["image_id"]]


@pytest.mark.parametrize(("images", "world"), [(24, 2), (25, 2), (7, 3), (1, 2)])
def test_validation_gives_every_image_to_exactly_one_rank(images, world):
    table = table_of(images)
    seen = pd.concat(pipeline.val_rows(table, rank, world) for rank in range(world))
    assert sorted(seen["image_id"]) == sorted(table["image_id"])


def test_a_grey_batch_becomes_on_the_device_what_its_rgb_batch_would():
    """Real Severstal images read as one channel, augmented and made model inputs: equal to
    the three-channel path's, at a third of the bytes through the pipeline."""
    import torch

    from steelseg.data import augment, catalog
    from steelseg.model.inputs import to_inputs

    table = catalog.load(Path(__file__).parents[1] / "real")
    rows = {c: table[c].to_numpy() for c in table} | {"sample": np.arange(len(table))}
    found = {}
    for grey in (False, True):
        batch = pipeline.read_batch(rows, ["visible"], grey=grey)
        batch = augment.augment_batch(batch, 256, 800, seed=3, defect_crops=0.5, epoch=2)
        found[grey] = batch
        tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
        found[grey, "x"] = to_inputs(tensors, torch.device("cpu"), True, grey=grey)[0]
    assert found[False]["image"].nbytes == 3 * found[True]["image"].nbytes
    np.testing.assert_array_equal(found[True]["mask"], found[False]["mask"])
    assert torch.equal(found[True, "x"], found[False, "x"])
    assert found[True, "x"].shape == (3, 3, 256, 800)


def _block(epoch: int, samples: range) -> dict[str, np.ndarray]:
    return {"epoch": np.full(len(samples), epoch), "sample": np.array(samples)}


def test_an_epochs_batches_end_at_its_last_row_and_leave_the_next_epochs_blocks():
    blocks = iter([_block(0, range(8)), _block(0, range(8, 11)), _block(1, range(8))])
    first = list(pipeline.epoch_batches(blocks, 11, 4, epoch=0))
    assert [b["sample"].tolist() for b in first] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert "epoch" not in first[0]
    second = list(pipeline.epoch_batches(blocks, 8, 4, epoch=1))
    assert [len(b["sample"]) for b in second] == [4, 4]
    assert next(blocks, None) is None


def test_an_epoch_given_another_epochs_rows_or_too_few_fails_naming_both():
    with pytest.raises(RuntimeError, match="a block of 8 rows of epoch 1 where epoch 0 has 8"):
        list(pipeline.epoch_batches(iter([_block(1, range(8))]), 8, 4, epoch=0))
    with pytest.raises(RuntimeError, match="a block of 8 rows of epoch 0 where epoch 0 has 6"):
        list(pipeline.epoch_batches(iter([_block(0, range(8))]), 6, 4, epoch=0))
    with pytest.raises(RuntimeError, match="of 6 rows of epoch 0 where epoch 0 has 11 rows left"):
        list(pipeline.epoch_batches(iter([_block(0, range(6))]), 11, 4, epoch=0))
    empty = iter([{}, _block(0, range(4))])  # a task that read no rows emits a bare block
    assert len(list(pipeline.epoch_batches(empty, 4, 4, epoch=0))) == 1
    with pytest.raises(RuntimeError, match="ended 4 rows before epoch 2's end"):
        list(pipeline.epoch_batches(iter([_block(2, range(4))]), 8, 4, epoch=2))


def test_validation_reads_every_row_in_order_in_batches_of_whole_images(tmp_path):
    from steelseg.data import catalog, synth

    data = synth.write_dataset(tmp_path / "data", 10, height=64, width=320, seed=0)
    rows = pipeline.val_rows(catalog.load(data, decode_images=False), rank=1, world=2)
    config = TrainConfig(batch_size=2)
    batches = list(pipeline.val_batches(rows, config, grey=True))
    assert [len(b["image"]) for b in batches] == [2, 2, 1]  # rows 1, 3, 5, 7, 9
    read = pipeline.read_batch({c: rows[c].to_numpy() for c in rows}, config.modalities, True)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), read["image"])
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), read["mask"])
    assert batches[0]["image"].shape == (2, 64, 320, 1)
    assert list(pipeline.val_batches(rows.iloc[:0], config)) == []
