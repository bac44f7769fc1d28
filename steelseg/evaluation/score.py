"""Scoring a submission against the truth: the Kaggle mean Dice over (image, class) pairs, per
class, over pairs with a defect, the all-empty baseline, and image-level presence precision and
recall per class. The images of one folder are the set scored; truth rows of other images are
ignored, so the full train.csv scores a folder holding the validation images only.

A submission has a row for every (image, class) pair of the folder, as Kaggle's sample submission
does and its scorer requires (an empty EncodedPixels is "no defect"): a missing pair is an error,
as a missing image is, never scored as "no defect"."""

from pathlib import Path

import numpy as np
import torch

from steelseg.data import catalog, rle
from steelseg.domain import CLASS_IDS, N_CLASSES
from steelseg.errors import RLEError, SteelsegError
from steelseg.evaluation.metrics import DiceCounts, Scores
from steelseg.storage import Location, locate


def read_rows(
    csv_path: "str | Path | Location", listed: set[tuple[str, int]] | None = None
) -> dict[str, dict[int, catalog.MaskRow]]:
    """image -> {class: row} of a train.csv or a submission's non-empty rows; a bad row is an
    error naming the file and row. ``listed`` collects the (image, class) pairs with a row."""
    rows, problems = catalog.read_masks(csv_path, listed)
    if problems:
        raise SteelsegError(f"{len(problems)} bad row(s) in {csv_path}, first: {problems[0]}")
    masks: dict[str, dict[int, catalog.MaskRow]] = {}
    for row in rows:
        masks.setdefault(row.image_id, {})[row.class_id] = row
    return masks


def rows_to_masks(
    rows: dict[int, catalog.MaskRow], height: int, width: int, source: "str | Path | Location"
) -> np.ndarray:
    """(4, H, W) masks of an image's rows; a bad RLE is an error naming ``source`` and the row."""
    masks = np.zeros((N_CLASSES, height, width), np.uint8)
    for class_id, row in rows.items():
        try:
            masks[class_id - 1] = rle.decode(
                row.rle, height, width, image_id=row.image_id, class_id=class_id
            )
        except RLEError as e:
            raise SteelsegError(f"{source} row {row.line}: {e}") from None
    return masks


def score_submission(truth_csv: str, images_dir: str, submission_csv: str) -> Scores:
    """Score ``submission_csv`` on the images of ``images_dir`` (each a local path or a URI).

    Raises:
        SteelsegError: an unreadable file, a bad row or RLE (named), or a submission that misses
            images of the folder or (image, class) pairs of them, or names images outside it.
    """
    folder = locate(images_dir, "images")
    truth, submission = locate(truth_csv, "truth"), locate(submission_csv, "submission")
    names = catalog.list_images(folder)
    if not names:
        raise SteelsegError(f"{folder}: no .jpg images to score")
    true_rows = read_rows(truth)
    listed: set[tuple[str, int]] = set()
    predicted = read_rows(submission, listed)
    check_rows(submission, folder, names, listed)
    counts = DiceCounts()
    infos = catalog.inspect_many([(folder / name).target for name in names], decode=False)
    sums = np.zeros((3, len(names), N_CLASSES))  # intersection, predicted, true pixels
    for i, (name, info) in enumerate(zip(names, infos)):
        if info.error:
            raise SteelsegError(f"{folder / name}: {info.error}")
        true = image_runs(true_rows.get(name, {}), info.height, info.width, truth)
        pred = image_runs(predicted.get(name, {}), info.height, info.width, submission)
        for c, (p, t) in enumerate(zip(pred, true)):
            sums[:, i, c] = rle.overlap(p, t), p[1::2].sum(), t[1::2].sum()
    counts.add_pairs(*torch.from_numpy(sums))
    return counts.compute()


def image_runs(
    rows: dict[int, catalog.MaskRow], height: int, width: int, source: "str | Path | Location"
) -> list[np.ndarray]:
    """Each class's ``rle.run_lengths`` for an image's rows (no rows: one gap over the image);
    a bad RLE is an error naming ``source`` and the row. Scoring works on runs, never on decoded
    masks: a 256x1600 image's four masks are 1.6 MB, their runs a few hundred numbers."""
    out = []
    for class_id in CLASS_IDS:
        row = rows.get(class_id)
        if row is None:
            out.append(np.array([height * width], np.int64))
            continue
        try:
            out.append(
                rle.run_lengths(row.rle, height, width, image_id=row.image_id, class_id=class_id)
            )
        except RLEError as e:
            raise SteelsegError(f"{source} row {row.line}: {e}") from None
    return out


def check_rows(
    submission: Location, folder: Location, names: list[str], listed: set[tuple[str, int]]
) -> None:
    """A submission must have a row for each class of every image of the folder, and no other.

    Raises:
        SteelsegError: images or (image, class) pairs without a row, or images outside the
            folder: how many, and the first.
    """
    named = {image for image, _ in listed}
    missing = sorted(set(names) - named)
    if missing:
        other = {n.casefold(): n for n in named}.get(missing[0].casefold())
        note = f" (its {other} differs only in case)" if other else ""
        raise SteelsegError(
            f"{submission}: no rows for {len(missing)} image(s) of {folder}, e.g. {missing[0]}"
            + note
        )
    extra = sorted(named - set(names))
    if extra:
        raise SteelsegError(f"{submission}: {len(extra)} image(s) not in {folder}, e.g. {extra[0]}")
    gaps = [(name, c) for name in names for c in CLASS_IDS if (name, c) not in listed]
    if gaps:
        image, class_id = gaps[0]
        raise SteelsegError(
            f"{submission}: no row for {len(gaps)} (image, class) pair(s), e.g. {image} class "
            f"{class_id} (an empty EncodedPixels says no defect)"
        )


def format_scores(scores: Scores, images: int | None = None) -> str:
    """A small table: the overall figures, then one line per class."""

    def show(value: float) -> str:
        return "  n/a" if value != value else f"{value:.4f}"  # NaN: no such pairs

    lines = [
        f"Kaggle mean Dice      {show(scores.kaggle_dice)}"
        + (f"  ({images} images x 4 classes)" if images else ""),
        f"all-empty baseline    {show(scores.empty_baseline)}",
        f"Dice, defect pairs    {show(scores.dice_nonempty)}",
        "class  Dice    Dice(defect)  presence precision  recall",
    ]
    for c in range(N_CLASSES):
        dice, defect = scores.dice_per_class[c], scores.dice_nonempty_per_class[c]
        precision, recall = scores.presence_precision[c], scores.presence_recall[c]
        lines.append(
            f"{c + 1:>5}  {show(dice)}  {show(defect)}        {show(precision)}"
            f"              {show(recall)}"
        )
    return "\n".join(lines)
