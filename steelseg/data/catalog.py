"""The Severstal folder as one table: a row per image with its path, size and 4 RLE strings.

``scan`` reads ``DATA_DIR/train.csv`` (current or original format) and ``DATA_DIR/train_images/``
and returns the table with every problem it found; ``load`` is the strict form used for
training; ``split`` makes the train/validation split; ``save`` and ``read`` keep the table as
Parquet.

Names match exactly, case included, as Kaggle's ids and object-store keys do: a row for
``118060761.jpg`` does not name ``train_images/118060761.JPG``. Such a row is a problem that names
the file differing only in case, and is tied to that image, so that ``load(drop_bad=True)`` drops
it: an image that rows name is never kept without its masks, as if it were defect-free.
"""

import csv
import hashlib
import io
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from steelseg.data import rle
from steelseg.data.images import is_grey, open_image
from steelseg.domain import (
    CLASS_IDS,
    CURRENT_HEADER,
    HAS_COLUMNS,
    ORIGINAL_HEADER,
    SUBMISSION_HEADER,
)
from steelseg.errors import RLEError, SteelsegError
from steelseg.storage import Location, is_uri, locate, reason

HEADERS = (CURRENT_HEADER, ORIGINAL_HEADER, SUBMISSION_HEADER)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data set, tied to an image where there is one."""

    where: str
    message: str
    image_id: str | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class DataProblems(SteelsegError):
    """A data set with problems was loaded for training."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))


@dataclass(frozen=True)
class MaskRow:
    image_id: str
    class_id: int
    rle: str
    line: int


def modality_dir(modality: str) -> str:
    """``train_images`` for the visible modality, ``train_images_<name>`` for any other."""
    return "train_images" if modality == "visible" else f"train_images_{modality}"


def read_masks(
    csv_path: "str | os.PathLike | Location", listed: set[tuple[str, int]] | None = None
) -> tuple[list[MaskRow], list[Problem]]:
    """Read train.csv in either format (or a submission), local or in a bucket, into non-empty
    mask rows and per-row problems; ``listed`` collects every (image, class) pair the file has a
    row for, empty rows included.

    Raises:
        SteelsegError: the file is missing or its header is neither known format.
    """
    location = locate(csv_path, "CSV file")
    try:
        text = location.read_bytes().decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a BOM
    except UnicodeDecodeError as e:
        raise SteelsegError(f"{location}: not a readable CSV file ({e})") from None
    try:
        return _read_mask_rows(csv.reader(io.StringIO(text, newline="")), location.name, listed)
    except csv.Error as e:
        raise SteelsegError(f"{location}: not a readable CSV file ({e})") from None


def _read_mask_rows(
    reader, name: str, listed: set[tuple[str, int]] | None = None
) -> tuple[list[MaskRow], list[Problem]]:
    header = tuple(next(reader, ()))
    if header not in HEADERS:
        raise SteelsegError(
            f"{name}: header {','.join(header)!r} is none of "
            + ", ".join(repr(",".join(h)) for h in HEADERS)
        )
    rows: list[MaskRow] = []
    problems: list[Problem] = []
    seen: dict[tuple[str, int], int] = {}  # (image, class) -> the row that gave it
    for fields in reader:
        where = f"{name} row {reader.line_num}"
        if not fields:
            continue
        if len(fields) != len(header):
            problems.append(Problem(where, f"expected {len(header)} fields, found {len(fields)}"))
            continue
        if header == CURRENT_HEADER:
            image_id, class_text, encoded = fields
        elif header == SUBMISSION_HEADER:
            image_id, encoded, class_text = fields
        else:
            key, encoded = fields
            image_id, _, class_text = key.rpartition("_")
            if not image_id:
                problems.append(Problem(where, f"ImageId_ClassId {key!r} has no '_<ClassId>'"))
                continue
        if class_text not in {str(c) for c in CLASS_IDS}:
            problems.append(Problem(where, f"ClassId {class_text!r} is not one of 1..4", image_id))
            continue
        class_id = int(class_text)
        if listed is not None:
            listed.add((image_id, class_id))
        if (image_id, class_id) in seen:
            first = seen[(image_id, class_id)]
            problems.append(
                Problem(where, f"duplicate of row {first} ({image_id} class {class_id})", image_id)
            )
            continue
        seen[(image_id, class_id)] = reader.line_num
        if encoded.strip():
            rows.append(MaskRow(image_id, class_id, encoded.strip(), reader.line_num))
    return rows, problems


@dataclass(frozen=True)
class ImageInfo:
    height: int = 0
    width: int = 0
    channels: int = 0
    error: str = ""
    grey: bool = False  # decoded, and its channels are equal


HEADER_BYTES = 64 * 1024  # holds a JPEG's size marker unless the file has large metadata


def inspect_image(path: str, *, decode: bool = True) -> ImageInfo:
    """Size and channel count of an image (a local path or a bucket URI); with ``decode`` the
    pixels are read too, which is what finds a truncated JPEG, and whether its channels are
    equal (``grey``). Without it, an image in a bucket costs one ranged read of its first
    bytes."""
    head = None if decode or not is_uri(path) else HEADER_BYTES
    try:
        try:
            im = open_image(path, head)
        except OSError:
            if head is None:
                raise
            im = open_image(path)  # the size marker lies beyond the first bytes
        with im:
            grey = False
            if decode:
                im.load()
                grey = is_grey(np.asarray(im))
            return ImageInfo(im.height, im.width, len(im.getbands()), grey=grey)
    except (OSError, SyntaxError, ValueError) as e:
        return ImageInfo(error=f"unreadable image ({e})")
    except SteelsegError as e:  # from the store: a missing object, no access
        return ImageInfo(error=str(e).split(": ", 1)[-1])


def inspect_many(paths: Sequence[str], decode: bool) -> list[ImageInfo]:
    """``inspect_image`` for every path, in threads on this machine."""
    # PIL releases the GIL while it decodes, and a bucket's reads wait on the network: threads
    # use every core.
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda p: inspect_image(p, decode=decode), paths, chunksize=16))


Inspect = Callable[[Sequence[str], bool], list[ImageInfo]]


def _check_images(
    images: pd.DataFrame,
    expected_size: tuple[int, int] | None,
    decode: bool,
    folder: str,
    inspect: Inspect,
) -> tuple[tuple[int, int] | None, list[Problem]]:
    infos = inspect(list(images["path"]), decode)
    images["height"] = [i.height for i in infos]
    images["width"] = [i.width for i in infos]
    images["grey"] = [i.grey for i in infos]
    readable = [(i.height, i.width) for i in infos if not i.error]
    if expected_size is None and readable:
        expected_size = Counter(readable).most_common(1)[0][0]
    problems = []
    for image_id, info in zip(images["image_id"], infos):
        where = f"{folder}/{image_id}"
        if info.error:
            problems.append(Problem(where, info.error, image_id))
        elif (info.height, info.width) != expected_size:
            assert expected_size is not None  # this image is readable, so a size was found
            h, w = expected_size
            problems.append(
                Problem(where, f"size {info.height}x{info.width} (HxW), expected {h}x{w}", image_id)
            )
        elif info.channels != 3:
            problems.append(Problem(where, f"{info.channels} channel(s), expected 3", image_id))
    return expected_size, problems


def _check_rle(
    table: pd.DataFrame, rows: list[MaskRow], skip: set[str], csv_name: str
) -> list[Problem]:
    """Problems with the RLE strings, except for images already reported (their size is moot)."""
    size = dict(zip(table["image_id"], zip(table["height"], table["width"])))
    problems = []
    for row in rows:
        if row.image_id in skip:
            continue
        height, width = size[row.image_id]
        try:
            rle.run_lengths(row.rle, height, width, image_id=row.image_id, class_id=row.class_id)
        except RLEError as e:
            problems.append(Problem(f"{csv_name} row {row.line}", str(e), row.image_id))
    return problems


def list_images(folder: "str | os.PathLike | Location") -> list[str]:
    """The JPEG file names in a local folder or under a bucket prefix, sorted."""
    folder = locate(folder, "images")
    if not folder.is_dir():
        raise SteelsegError(f"{folder}: no such folder of images")
    names = (child.name for child in folder.children())
    return sorted(n for n in names if n.lower().endswith((".jpg", ".jpeg")))


def scan(
    data_dir: "str | os.PathLike | Location",
    *,
    modalities: Sequence[str] = ("visible",),
    expected_size: tuple[int, int] | None = None,
    decode_images: bool = True,
    inspect: Inspect = inspect_many,
) -> tuple[pd.DataFrame, list[Problem]]:
    """Read a Severstal folder (local, or a bucket's ``s3://`` / ``gs://`` prefix) and check
    every CSV row and every image.

    Args:
        data_dir: holds ``train.csv`` and ``train_images/`` (and ``train_images_<m>/`` for every
            extra modality ``m``, with the same file names).
        modalities: image folders to read, in channel order; the first defines the image list.
        expected_size: (height, width) every image must have; by default the most common size.
        decode_images: read every image's pixels (finds truncated JPEGs) rather than headers.
        inspect: reads the images' sizes (``inspect_many``: threads on this machine); the
            train job passes one that runs on the cluster's nodes.

    Returns:
        The table (a row per image in the first modality's folder, defect-free ones included,
        columns ``image_id, path, path_<m>..., height, width, grey, rle_1..rle_4,
        has_1..has_4``; ``grey``: decoded, with equal channels)
        and the list of problems, empty for a clean data set.

    Raises:
        SteelsegError: a missing folder or CSV, or a CSV header of neither known format.
    """
    data = locate(data_dir, "data")
    if not data.is_dir():
        raise SteelsegError(f"{data}: no such data folder")
    rows, problems = read_masks(data / "train.csv")
    first = modality_dir(modalities[0])
    image_ids = list_images(data / first)
    table = pd.DataFrame({"image_id": image_ids})
    table["path"] = [(data / first / i).target for i in image_ids]
    expected_size, image_problems = _check_images(
        table, expected_size, decode_images, first, inspect
    )
    for modality in modalities[1:]:
        image_problems += _add_modality(
            table, data, modality, expected_size, decode_images, inspect
        )
    problems += image_problems

    known, folded = set(image_ids), _by_folded_case(image_ids)
    for row in rows:
        if row.image_id not in known:
            problems.append(_missing_image(row, folded, first))
    rows = [r for r in rows if r.image_id in known]
    bad_images = {p.image_id for p in image_problems if p.image_id}
    problems += _check_rle(table, rows, bad_images, "train.csv")
    _add_masks(table, rows)
    return table, problems


def _missing_image(row: MaskRow, folded: dict[str, str], folder: str) -> Problem:
    """A row whose image is not in the folder. An image whose name differs only in case is named,
    and the problem is tied to it: ``load(drop_bad=True)`` drops it rather than keep it as a
    defect-free image."""
    message = f"image {row.image_id} is not in {folder}/"
    other = folded.get(row.image_id.casefold())
    if other:
        message += f" ({other} differs only in case)"
    return Problem(f"train.csv row {row.line}", message, other or row.image_id)


def _by_folded_case(names: Iterable[str]) -> dict[str, str]:
    return {name.casefold(): name for name in names}


def _add_modality(
    table: pd.DataFrame,
    data: Location,
    modality: str,
    expected_size: tuple[int, int] | None,
    decode_images: bool,
    inspect: Inspect,
) -> list[Problem]:
    folder = modality_dir(modality)
    if not (data / folder).is_dir():
        raise SteelsegError(f"{data / folder}: no such folder for modality {modality!r}")
    listed = set(list_images(data / folder))
    table[f"path_{modality}"] = [(data / folder / i).target for i in table["image_id"]]
    present = table["image_id"].isin(listed)
    problems, folded = [], _by_folded_case(listed)
    for image_id in table.loc[~present, "image_id"]:
        other = folded.get(image_id.casefold())
        note = f"; {other} differs only in case" if other else ""
        problems.append(
            Problem(f"{folder}/{image_id}", f"missing (modality {modality!r}{note})", image_id)
        )
    found = table.loc[present, ["image_id", f"path_{modality}"]].rename(
        columns={f"path_{modality}": "path"}
    )
    _, more = _check_images(found, expected_size, decode_images, folder, inspect)
    return problems + more


def _add_masks(table: pd.DataFrame, rows: list[MaskRow]) -> None:
    position = {image_id: i for i, image_id in enumerate(table["image_id"])}
    columns = {c: [""] * len(table) for c in CLASS_IDS}
    for row in rows:
        columns[row.class_id][position[row.image_id]] = row.rle
    for c in CLASS_IDS:
        table[f"rle_{c}"] = columns[c]
        table[f"has_{c}"] = table[f"rle_{c}"] != ""


def load(
    data_dir: "str | os.PathLike | Location",
    *,
    modalities: Sequence[str] = ("visible",),
    drop_bad: bool = False,
    report=print,
    decode_images: bool = True,
    inspect: Inspect = inspect_many,
    dropped: list[str] | None = None,
) -> pd.DataFrame:
    """The table of a data set for training: fails on any problem unless ``drop_bad``.
    ``decode_images=False`` checks image headers only (fast; a truncated JPEG goes unseen).
    ``dropped`` collects the images of the folder that ``drop_bad`` leaves out.

    Raises:
        DataProblems: the data set has problems and ``drop_bad`` is off; its message lists
            them, one a line, as ``steelseg validate`` prints them.
    """
    table, problems = scan(
        data_dir, modalities=modalities, decode_images=decode_images, inspect=inspect
    )
    if not problems:
        return table
    if not drop_bad:
        raise DataProblems(problems)
    bad = {p.image_id for p in problems}
    if None in bad:
        raise DataProblems([p for p in problems if p.image_id is None])
    keep = ~table["image_id"].isin(bad)
    if dropped is not None:
        dropped += list(table.loc[~keep, "image_id"])
    report(
        f"dropped {int((~keep).sum())} of {len(table)} images for {len(problems)} problems "
        f"(steelseg validate {data_dir} lists them)"
    )
    return table[keep].reset_index(drop=True)


def nothing_to_learn(table: pd.DataFrame, data_dir: "str | os.PathLike | Location") -> str | None:
    """The warning for a data set in which no image has a defect, None when some have: trained on
    it, a model can only learn to predict no defect anywhere."""
    if table[HAS_COLUMNS].to_numpy().any():
        return None
    return (
        f"{data_dir}: none of the {len(table)} images has a defect (no train.csv row with "
        "EncodedPixels): there is nothing to learn but predicting no defect"
    )


def presence_pattern(table: pd.DataFrame) -> pd.Series:
    """'0010' for an image with class 3 only, '0000' for a defect-free image."""
    return table[HAS_COLUMNS].astype(int).astype(str).agg("".join, axis=1)


def split(
    table: pd.DataFrame, *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A deterministic train/validation split by image, stratified on the class-presence pattern.

    The result depends only on the image ids, their patterns and the seed, not on row order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    table = table.sort_values("image_id").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(table), dtype=bool)
    for _, index in sorted(table.groupby(presence_pattern(table)).indices.items()):
        chosen = rng.permutation(index)[: round(val_fraction * len(index))]
        is_val[chosen] = True
    return table[~is_val].reset_index(drop=True), table[is_val].reset_index(drop=True)


def keep_split(
    table: pd.DataFrame, stored: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str]]:
    """The split a run made (``stored``, with its ``split`` column) applied to the data set as
    it is now (``table``): an image keeps its side; an image new since then goes to training
    only, never to validation, so no image crosses from one side to the other mid-run.

    Returns:
        (train, val, the new images, the images of the stored split that are gone).
    """
    sides = dict(zip(stored["image_id"], stored["split"]))
    table = table.sort_values("image_id").reset_index(drop=True)
    is_val = table["image_id"].map(sides).eq("val").to_numpy()
    new = sorted(set(table["image_id"]) - set(sides))
    gone = sorted(set(sides) - set(table["image_id"]))
    return table[~is_val].reset_index(drop=True), table[is_val].reset_index(drop=True), new, gone


def fingerprint(data_dir: "str | os.PathLike | Location", modalities: Sequence[str]) -> str:
    """A digest of a data set's listing: train.csv's and every image's name, size and
    modification time, in every modality's folder. Equal digests: the same files, unchanged
    (as far as a listing can tell), so a full check of them need not be repeated.

    Raises:
        SteelsegError: a folder or train.csv cannot be listed.
    """
    data = locate(data_dir, "data")
    digest = hashlib.sha1()
    places = [data / "train.csv", *(data / modality_dir(m) for m in modalities)]
    for place in places:
        try:
            if place.name == "train.csv":
                found = [place.fs.get_file_info(place.path)]
            else:
                found = place.fs.get_file_info(pafs.FileSelector(place.path, allow_not_found=True))
        except OSError as e:
            raise SteelsegError(f"{place}: {reason(e)}") from None
        for info in sorted(found, key=lambda i: i.path):
            digest.update(f"{info.path}|{info.size}|{info.mtime_ns}\n".encode())
    return digest.hexdigest()


def write_table(table: pd.DataFrame, path: str | os.PathLike | BinaryIO) -> None:
    table.to_parquet(path, engine="pyarrow", index=False)


def read_table(path: str | os.PathLike | BinaryIO) -> pd.DataFrame:
    try:
        return pd.read_parquet(path, engine="pyarrow")
    except (FileNotFoundError, OSError) as e:
        raise SteelsegError(f"{path}: cannot read catalog ({e})") from None


def summary(table: pd.DataFrame, problems: Sequence[Problem] = ()) -> dict:
    """Counts a user compares with DATA.md: masks and mean area per class, defect-free share.

    Images named in ``problems`` are left out: their size or masks cannot be trusted.
    """
    flagged = {p.image_id for p in problems}
    table = table[~table["image_id"].isin(flagged)]
    n = len(table)
    masks = {c: int(table[f"has_{c}"].sum()) for c in CLASS_IDS}
    n_classes = table[HAS_COLUMNS].sum(axis=1)
    area = {}
    for c in CLASS_IDS:
        rows = table[table[f"has_{c}"]]
        pixels = [rle.area(*r) for r in rows[[f"rle_{c}", "height", "width"]].itertuples(False)]
        sizes = rows["height"] * rows["width"]
        area[c] = float(np.mean(np.array(pixels) / sizes)) if len(pixels) else 0.0
    return {
        "images": n,
        "defect_free": int((n_classes == 0).sum()),
        "images_by_class_count": {k: int((n_classes == k).sum()) for k in (1, 2, 3, 4)},
        "masks": masks,
        "mean_area_fraction": area,
    }
