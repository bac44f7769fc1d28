"""Scoring submissions: perfect, empty and broken ones, on the real 256x1600 images."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steelseg.cli import main as steelseg
from steelseg.data import catalog
from steelseg.errors import SteelsegError


def write_submission(path: Path, masks: dict[str, dict[int, str]], names: list[str]) -> Path:
    rows = [(n, masks.get(n, {}).get(c, ""), c) for n in names for c in range(1, 5)]
    pd.DataFrame(rows, columns=["ImageId", "EncodedPixels", "ClassId"]).to_csv(path, index=False)
    return path


def test_evaluate_perfect_empty_and_broken_submissions(real_dir, tmp_path, capsys):
    from steelseg.evaluation.score import read_rows, score_submission

    images = real_dir / "train_images"
    names = catalog.list_images(images)
    rows = read_rows(real_dir / "train.csv")
    truth = {name: {c: row.rle for c, row in by_class.items()} for name, by_class in rows.items()}
    perfect = score_submission(
        real_dir / "train.csv", images, write_submission(tmp_path / "p.csv", truth, names)
    )
    assert perfect.kaggle_dice == 1.0 and perfect.dice_nonempty == 1.0
    present = [c for c in range(4) if not np.isnan(perfect.presence_recall[c])]
    assert present and all(perfect.presence_recall[c] == 1.0 for c in present)
    assert all(perfect.presence_precision[c] == 1.0 for c in present)
    empty = score_submission(
        real_dir / "train.csv", images, write_submission(tmp_path / "e.csv", {}, names)
    )
    pairs_with_defect = sum(len(v) for k, v in truth.items() if k in names)
    assert empty.kaggle_dice == pytest.approx(1 - pairs_with_defect / (4 * len(names)))
    assert empty.kaggle_dice == pytest.approx(empty.empty_baseline)

    write_submission(tmp_path / "short.csv", truth, names[:-1])
    code = steelseg(["evaluate", "--truth", str(real_dir / "train.csv"), "--images", str(images),
                     "--submission", str(tmp_path / "short.csv")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert (
        code == 1 and err.count("\n") == 0 and "no rows for 1 image(s)" in err and names[-1] in err
    )
    (tmp_path / "class5.csv").write_text(f"ImageId,EncodedPixels,ClassId\n{names[0]},1 2,5\n")
    with pytest.raises(SteelsegError, match="1 bad row.*class5.csv row 2: ClassId '5'"):
        score_submission(real_dir / "train.csv", images, tmp_path / "class5.csv")
    bad = {names[0]: {1: "5 10 3"}}  # an odd number of values
    write_submission(tmp_path / "bad.csv", bad, names)
    with pytest.raises(SteelsegError, match=names[0]):
        score_submission(real_dir / "train.csv", images, tmp_path / "bad.csv")


def test_evaluate_names_the_truth_file_and_row_of_a_bad_rle(real_dir, tmp_path, capsys):
    images = real_dir / "train_images"
    names = catalog.list_images(images)
    lines = (real_dir / "train.csv").read_text().splitlines()
    truth = tmp_path / "truth.csv"
    truth.write_text("\n".join([*lines, f"{names[0]},2,10 5 3 7"]) + "\n")
    write_submission(tmp_path / "empty.csv", {}, names)
    code = steelseg(["evaluate", "--truth", str(truth), "--images", str(images),
                     "--submission", str(tmp_path / "empty.csv")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert f"{truth} row {len(lines) + 1}: bad RLE for image {names[0]} class 2" in err


def test_a_submission_with_a_byte_order_mark_scores_as_without(real_dir, tmp_path):
    from steelseg.evaluation.score import read_rows, score_submission

    images = real_dir / "train_images"
    names = catalog.list_images(images)
    rows = read_rows(real_dir / "train.csv")
    truth = {name: {c: row.rle for c, row in by_class.items()} for name, by_class in rows.items()}
    path = write_submission(tmp_path / "p.csv", truth, names)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # Excel's "CSV UTF-8"
    assert score_submission(real_dir / "train.csv", images, path).kaggle_dice == 1.0


def evaluate(real_dir, submission: Path) -> int:
    return steelseg(["evaluate", "--truth", str(real_dir / "train.csv"), "--images",
                     str(real_dir / "train_images"), "--submission", str(submission)])  # fmt: skip


def test_a_missing_image_class_row_is_an_error_as_a_missing_image_is(real_dir, tmp_path, capsys):
    names = catalog.list_images(real_dir / "train_images")
    lines = write_submission(tmp_path / "all.csv", {}, names).read_text().splitlines()
    assert lines[1:5] == [f"{names[0]},,{c}" for c in (1, 2, 3, 4)]
    for dropped in ([f"{names[1]},,3"], [f"{names[1]},,3", f"{names[2]},,1"]):
        short = tmp_path / "short.csv"
        short.write_text("\n".join(line for line in lines if line not in dropped) + "\n")
        assert evaluate(real_dir, short) == 1
        assert capsys.readouterr().err == (
            f"steelseg: error: {short}: no row for {len(dropped)} (image, class) pair(s), e.g. "
            f"{names[1]} class 3 (an empty EncodedPixels says no defect)\n"
        )


def test_what_predict_writes_has_every_pair_and_scores(real_dir, tmp_path, capsys):
    from steelseg.inference.predict import to_submission, write_submission

    names = catalog.list_images(real_dir / "train_images")
    results = pd.DataFrame({"image_id": names, **{f"rle_{c}": [""] * 3 for c in (1, 2, 3, 4)}})
    results.loc[1, "rle_3"] = "1 10"
    out = write_submission(to_submission(results), tmp_path / "sub.csv")
    assert evaluate(real_dir, Path(out.path)) == 0
    assert capsys.readouterr().out.startswith("Kaggle mean Dice")


def test_a_submission_naming_an_image_in_another_case_says_so(real_dir, tmp_path, capsys):
    names = catalog.list_images(real_dir / "train_images")
    other = names[0].upper()  # 0A1CADE03.JPG
    submission = write_submission(tmp_path / "s.csv", {}, [other, *names[1:]])
    assert evaluate(real_dir, submission) == 1
    assert capsys.readouterr().err == (
        f"steelseg: error: {submission}: no rows for 1 image(s) of {real_dir / 'train_images'}, "
        f"e.g. {names[0]} (its {other} differs only in case)\n"
    )


def test_a_partly_right_submission_scores_as_the_decoded_masks_do(real_dir, tmp_path):
    """Scoring works on the runs; the Dice of each pair must equal the decoded masks' Dice."""
    import torch

    from steelseg.data import rle
    from steelseg.evaluation.metrics import DiceCounts
    from steelseg.evaluation.score import read_rows, score_submission

    images = real_dir / "train_images"
    names = catalog.list_images(images)
    rows = read_rows(real_dir / "train.csv")
    true = {n: rle.decode_classes([rows.get(n, {})[c].rle if c in rows.get(n, {}) else ""
                                   for c in range(1, 5)], 256, 1600) for n in names}  # fmt: skip
    pred = {n: np.roll(m, (3 + i, 40 * i), axis=(1, 2)) for i, (n, m) in enumerate(true.items())}
    pred[names[0]][2, :100, :100] = 1  # a false positive where the truth may be empty
    strings = {n: {c: rle.encode(m[c - 1]) for c in range(1, 5)} for n, m in pred.items()}
    scores = score_submission(
        real_dir / "train.csv", images, write_submission(tmp_path / "s.csv", strings, names)
    )
    expected = DiceCounts()
    for n in names:
        expected.update(torch.from_numpy(pred[n][None]), torch.from_numpy(true[n][None]))
    assert 0.1 < scores.kaggle_dice < 0.99
    np.testing.assert_equal(scores.as_dict(), expected.compute().as_dict())  # NaN == NaN
