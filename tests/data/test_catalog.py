import numpy as np
import pandas as pd
import pytest
from PIL import Image

from steelseg.data import catalog
from steelseg.domain import CLASS_IDS, HAS_COLUMNS
from steelseg.errors import SteelsegError


def append_rows(data_dir, *lines):
    with open(data_dir / "train.csv", "a") as f:
        f.write("".join(line + "\n" for line in lines))


def messages(problems):
    return [str(p) for p in problems]


def test_real_folder_gives_one_row_per_image_with_defect_free_ones(real_dir):
    table, problems = catalog.scan(real_dir)
    assert problems == []
    assert table["image_id"].tolist() == ["0a1cade03.jpg", "72aaba8ad.jpg", "b2ad335bf.jpg"]
    assert table[HAS_COLUMNS].values.tolist() == [
        [False, False, False, False],
        [False, False, False, True],
        [False, False, True, False],
    ]
    assert (table["height"] == 256).all() and (table["width"] == 1600).all()
    assert table.loc[0, "rle_1"] == ""


def test_original_format_reads_the_same_table(data_copy):
    current, _ = catalog.scan(data_copy)
    rows = pd.read_csv(data_copy / "train.csv")
    lines = ["ImageId_ClassId,EncodedPixels"]
    for image_id in current["image_id"]:
        for c in CLASS_IDS:
            hit = rows[(rows.ImageId == image_id) & (rows.ClassId == c)]
            lines.append(f"{image_id}_{c},{hit.EncodedPixels.iloc[0] if len(hit) else ''}")
    (data_copy / "train.csv").write_text("\n".join(lines) + "\n")
    original, problems = catalog.scan(data_copy)
    assert problems == []
    assert len(lines) == 1 + 4 * len(current)
    pd.testing.assert_frame_equal(original, current)


def test_synthetic_data_is_clean(synth_dir):
    table, problems = catalog.scan(synth_dir)
    assert problems == [] and len(table) == 60


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{img},2,1 2 3", "train.csv row 2: bad RLE for image {img} class 2: odd number"),
        ("{img},5,1 2", "train.csv row 2: ClassId '5' is not one of 1..4"),
        ("{img},x,1 2", "train.csv row 2: ClassId 'x' is not one of 1..4"),
        ("{img},1,1 2,extra", "train.csv row 2: expected 3 fields, found 4"),
        ("nothere.jpg,1,1 2", "train.csv row 2: image nothere.jpg is not in train_images/"),
        ("{img},1,20470 100", "train.csv row 2: bad RLE for image {img} class 1: run 1 ends"),
    ],
)
def test_each_csv_problem_names_file_and_row(data_copy, line, expected):
    img = sorted(p.name for p in (data_copy / "train_images").iterdir())[0]
    (data_copy / "train.csv").write_text("ImageId,ClassId,EncodedPixels\n")
    append_rows(data_copy, line.format(img=img))
    _, problems = catalog.scan(data_copy)
    assert len(problems) == 1
    assert messages(problems)[0].startswith(expected.format(img=img))


def test_duplicate_image_class_is_a_problem(data_copy):
    rows = (data_copy / "train.csv").read_text().splitlines()
    append_rows(data_copy, rows[1])
    _, problems = catalog.scan(data_copy)
    assert len(problems) == 1
    assert f"duplicate of row 2 ({rows[1].split(',')[0]} class" in str(problems[0])


def test_each_image_problem_names_the_file(data_copy):
    folder = data_copy / "train_images"
    names = sorted(p.name for p in folder.iterdir())
    whole = (folder / names[0]).read_bytes()
    (folder / names[0]).write_bytes(whole[: len(whole) // 2])
    (folder / names[1]).write_text("not a jpeg")
    Image.new("RGB", (160, 32)).save(folder / names[2])
    Image.new("L", (320, 64)).save(folder / names[3])
    _, problems = catalog.scan(data_copy)
    found = dict((p.image_id, p.message) for p in problems)
    assert len(problems) == 4
    assert "truncated" in found[names[0]]
    assert "unreadable image" in found[names[1]]
    assert found[names[2]] == "size 32x160 (HxW), expected 64x320"
    assert found[names[3]] == "1 channel(s), expected 3"
    assert str(problems[0]).startswith(f"train_images/{names[0]}: unreadable image")


def test_expected_size_can_be_required(synth_dir):
    _, problems = catalog.scan(synth_dir, expected_size=(256, 1600))
    assert len(problems) == 60 and "expected 256x1600" in problems[0].message


def test_header_missing_folder_and_csv_are_errors(data_copy, tmp_path):
    with pytest.raises(SteelsegError, match="no such data folder"):
        catalog.scan(tmp_path / "nope")
    (data_copy / "train.csv").write_text("a,b\n")
    with pytest.raises(SteelsegError, match="train.csv: header 'a,b' is none of"):
        catalog.scan(data_copy)
    (data_copy / "train.csv").unlink()
    with pytest.raises(SteelsegError, match="train.csv: no such file"):
        catalog.scan(data_copy)


def test_load_fails_with_the_validate_messages_unless_told_to_drop(data_copy):
    rows = (data_copy / "train.csv").read_text().splitlines()
    bad_image = rows[1].split(",")[0]
    append_rows(data_copy, f"{bad_image},{rows[1].split(',')[1]},1 2", "ghost.jpg,1,1 2")
    _, problems = catalog.scan(data_copy)
    with pytest.raises(catalog.DataProblems) as info:
        catalog.load(data_copy)
    assert str(info.value).splitlines() == messages(problems)
    printed, dropped = [], []
    table = catalog.load(data_copy, drop_bad=True, report=printed.append, dropped=dropped)
    assert len(table) == 59 and bad_image not in set(table["image_id"])
    assert dropped == [bad_image]
    assert printed == [
        f"dropped 1 of 60 images for 2 problems (steelseg validate {data_copy} lists them)"
    ]


def test_split_is_deterministic_stratified_and_order_free(synth_dir):
    table, _ = catalog.scan(synth_dir)
    big = pd.concat([table.assign(image_id=table["image_id"] + f"-{k}") for k in range(10)])
    train, val = catalog.split(big, val_fraction=0.25, seed=3)
    _, again_val = catalog.split(big.sample(frac=1, random_state=1), val_fraction=0.25, seed=3)
    assert val["image_id"].tolist() == again_val["image_id"].tolist()
    assert set(train["image_id"]).isdisjoint(val["image_id"])
    assert len(train) + len(val) == len(big)
    patterns_all = catalog.presence_pattern(big).value_counts()
    patterns_val = catalog.presence_pattern(val).value_counts()
    for pattern, n in patterns_all.items():
        assert patterns_val.get(pattern, 0) == round(0.25 * n)
    _, other_val = catalog.split(big, val_fraction=0.25, seed=4)
    assert set(other_val["image_id"]) != set(val["image_id"])


def test_parquet_round_trip(synth_dir, tmp_path):
    table, _ = catalog.scan(synth_dir)
    catalog.write_table(table, tmp_path / "catalog.parquet")
    pd.testing.assert_frame_equal(catalog.read_table(tmp_path / "catalog.parquet"), table)


def test_summary_counts(real_dir):
    s = catalog.summary(catalog.scan(real_dir)[0])
    assert s["images"] == 3 and s["defect_free"] == 1
    assert s["masks"] == {1: 0, 2: 0, 3: 1, 4: 1}
    assert s["mean_area_fraction"][4] == pytest.approx(24515 / (256 * 1600))
    assert np.isclose(s["mean_area_fraction"][1], 0.0)


def test_a_csv_with_a_byte_order_mark_reads_as_without(data_copy):
    """Excel's "CSV UTF-8" starts the file with a UTF-8 byte-order mark."""
    plain, _ = catalog.scan(data_copy)
    text = (data_copy / "train.csv").read_text()
    (data_copy / "train.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    table, problems = catalog.scan(data_copy)
    assert problems == []
    pd.testing.assert_frame_equal(table, plain)


def rename_to_upper_case_extension(data_dir, folder="train_images") -> tuple[str, str, list[int]]:
    """An image with rows saved as .JPG: (its id in train.csv, its file name, its rows' lines)."""
    lines = (data_dir / "train.csv").read_text().splitlines()
    image_id = lines[1].split(",")[0]
    upper = image_id.removesuffix(".jpg") + ".JPG"
    (data_dir / folder / image_id).rename(data_dir / folder / upper)
    rows = [n for n, line in enumerate(lines, start=1) if line.startswith(image_id + ",")]
    return image_id, upper, rows


def test_a_row_whose_image_differs_only_in_case_names_the_file(data_copy):
    image_id, upper, rows = rename_to_upper_case_extension(data_copy)
    table, problems = catalog.scan(data_copy)
    assert upper in set(table["image_id"])  # the listing takes .JPG
    note = f"({upper} differs only in case)"
    assert messages(problems) == [
        f"train.csv row {n}: image {image_id} is not in train_images/ {note}" for n in rows
    ]
    assert {p.image_id for p in problems} == {upper}


def test_drop_bad_drops_an_image_whose_rows_name_it_in_another_case(data_copy):
    _, upper, rows = rename_to_upper_case_extension(data_copy)
    printed = []
    table = catalog.load(data_copy, drop_bad=True, report=printed.append)
    assert len(table) == 59 and upper not in set(table["image_id"])
    assert printed == [
        f"dropped 1 of 60 images for {len(rows)} problems "
        f"(steelseg validate {data_copy} lists them)"
    ]


def test_an_extra_modality_image_that_differs_only_in_case_is_named(data_copy):
    import shutil

    shutil.copytree(data_copy / "train_images", data_copy / "train_images_ir")
    image_id, upper, _ = rename_to_upper_case_extension(data_copy, "train_images_ir")
    _, problems = catalog.scan(data_copy, modalities=("visible", "ir"))
    assert messages(problems) == [
        f"train_images_ir/{image_id}: missing (modality 'ir'; {upper} differs only in case)"
    ]


def test_nothing_to_learn_only_without_any_defect(synth_dir):
    table, _ = catalog.scan(synth_dir)
    assert catalog.nothing_to_learn(table, "d") is None
    one = table.assign(**dict.fromkeys(HAS_COLUMNS, False))
    one.loc[5, "has_2"] = True
    assert catalog.nothing_to_learn(one, "d") is None
    clean = table.assign(**dict.fromkeys(HAS_COLUMNS, False))
    assert catalog.nothing_to_learn(clean, "d").startswith("d: none of the 60 images has a defect")
