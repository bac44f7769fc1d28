"""Batch prediction with Ray Data, in three stages: CPU tasks read the JPEGs (``read_images``); a
pool of actors holds the model and turns images into class masks (``Predictor``: each image at
its full size, padded to a multiple of 32, optionally averaged over flips, post-processed by the
checkpoint's calibrated rules); CPU tasks encode the masks as RLE (``encode_masks``). So the
device never waits on a JPEG decode or an RLE encode. The result is a Kaggle submission (four
rows per image).
"""

import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from steelseg.cluster import init_ray, without_ray_notes
from steelseg.data import catalog, images, rle
from steelseg.domain import N_CLASSES, RLE_COLUMNS, SUBMISSION_HEADER
from steelseg.errors import SteelsegError
from steelseg.inference import postprocess
from steelseg.model import inputs
from steelseg.runs import load_checkpoint, load_config, load_rules, resolve_checkpoint
from steelseg.storage import Location, locate

log = logging.getLogger(__name__)


def flips(tta: bool) -> list[tuple[int, ...]]:
    """Dims to flip for each view: none, and with TTA also horizontal and vertical."""
    return [(), (3,), (2,)] if tta else [()]


def probabilities(
    model: torch.nn.Module,
    batch: np.ndarray,
    device: torch.device,
    tta: bool = False,
    amp: bool = True,
) -> np.ndarray:
    """(B, H, W, C) uint8 images of one size -> (B, 4, H, W) float32 probabilities, any H, W."""
    return probability_tensor(model, batch, device, tta, amp).cpu().numpy()


@torch.no_grad()
def probability_tensor(
    model: torch.nn.Module,
    batch: np.ndarray,
    device: torch.device,
    tta: bool = False,
    amp: bool = True,
) -> torch.Tensor:
    """``probabilities`` left on the device. Each flipped view is padded on its own, so TTA is
    exactly the mean of predicting the flipped images. ``amp``: the checkpoint's config.amp
    (``inputs.autocast_dtype`` decides what it means on ``device``)."""
    if not batch.flags.writeable:  # torch warns of a read-only array (an image's, Arrow's)
        batch = batch.copy()
    x, _ = inputs.to_inputs(
        {"image": torch.from_numpy(batch), "mask": torch.zeros(batch.shape[:3], dtype=torch.uint8)},
        device,
        channels_last=inputs.prefers_channels_last(device, amp),
    )
    total: torch.Tensor | None = None
    for dims in flips(tta):
        view = x.flip(dims) if dims else x
        with inputs.autocast(device, amp):
            logits = inputs.forward_padded(model, view)
        probs = torch.sigmoid(logits.float())
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None  # flips() always has the plain view
    return total / len(flips(tta))


def image_paths(
    images_dir: "str | os.PathLike | Location", modalities: Sequence[str]
) -> pd.DataFrame:
    """One row per image in ``images_dir`` (a folder or a bucket prefix): image_id and a path
    per modality; an extra modality lives in the sibling folder ``<images_dir>_<modality>``
    (train_images -> train_images_ir)."""
    images_dir = locate(images_dir, "images")
    names = catalog.list_images(images_dir)
    if not names:
        raise SteelsegError(f"{images_dir}: no .jpg images")
    table = pd.DataFrame({"image_id": names, "path": [(images_dir / n).target for n in names]})
    for m in modalities[1:]:
        folder = images_dir.parent / f"{images_dir.name}_{m}"
        table[f"path_{m}"] = [(folder / n).target for n in names]
    return table


def ragged(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """A column of arrays of different shapes, as Ray Data carries them."""
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        column[i] = array
    return column


def read_images(batch: dict[str, np.ndarray], modalities: Sequence[str]) -> dict[str, np.ndarray]:
    """The CPU stage before the model: image paths -> ``image`` (H, W, C) uint8 arrays, an
    unreadable image's empty, with its ``error``."""
    columns = images.path_columns(list(modalities))
    channels = images.in_channels(modalities)
    read, errors = [], []
    for i in range(len(batch["image_id"])):
        try:
            read.append(images.read_stack([batch[c][i] for c in columns]))
            errors.append("")
        except SteelsegError as e:
            read.append(np.zeros((0, 0, channels), np.uint8))
            errors.append(str(e))
    return {
        "image_id": batch["image_id"],
        "image": ragged(read),
        "error": np.array(errors, dtype=object),
    }


# reading and encoding are light (a JPEG decode and an RLE encode: milliseconds an image, the
# model's forward a second on a CPU), so their tasks take half a CPU; with resources other than
# the model actors' they also stay tasks of their own, which Ray Data would otherwise fuse into
# the actors (a task stage fuses into a following actor pool whose resources match)
LIGHT_STAGE_CPUS = 0.5

CLASS_BITS = (1 << np.arange(N_CLASSES, dtype=np.uint8)).reshape(1, -1, 1, 1)


class Predictor:
    """A Ray Data actor: the model loaded once, then batches of images -> ``bits`` (H, W) uint8
    masks, bit c set where class c + 1 is found after the rules. ``predict_bits`` is the same
    step for a list of images, which the HTTP service (``steelseg.inference.serve``) calls."""

    def __init__(self, checkpoint: str, tta: bool, rules: dict | None, use_gpu: bool | None):
        self.device = device_for(use_gpu)
        model, self.config, _ = load_checkpoint(checkpoint)
        self.amp = self.config.amp
        self.model = prepare(model, self.device, self.amp)
        self.tta = tta
        self.rules = postprocess.Rules.from_dict(rules) if rules else postprocess.Rules.plain()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        bits = [np.zeros((0, 0), np.uint8)] * n
        readable = [i for i in range(n) if not batch["error"][i]]
        found, _ = self.predict_bits([batch["image"][i] for i in readable])
        for i, mask in zip(readable, found):
            bits[i] = mask
        return {"image_id": batch["image_id"], "bits": ragged(bits), "error": batch["error"]}

    def predict_bits(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """(H, W, C) uint8 images of any sizes, predicted a size at a time -> each image's
        ``bits`` and (N, 4) scores: each class's highest probability on the image (what a
        rule's gate compares)."""
        bits: list[np.ndarray] = [np.zeros((0, 0), np.uint8)] * len(images)
        scores = np.zeros((len(images), N_CLASSES), np.float32)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.shape[:2], []).append(i)
        for indices in by_size.values():
            stack = np.stack([images[i] for i in indices])
            probs = probability_tensor(self.model, stack, self.device, self.tta, self.amp)
            masks, _ = self.rules.apply_batch(probs)
            packed = (masks * CLASS_BITS).sum(axis=1, dtype=np.uint8)
            peaks = probs.amax(dim=(2, 3)).cpu().numpy()
            for j, i in enumerate(indices):
                bits[i], scores[i] = packed[j], peaks[j]
        return bits, scores


def encode_bits(bits: np.ndarray) -> list[str]:
    """An image's class bits -> the RLE string of each class ('' where it has none)."""
    masks = [(bits >> c) & 1 for c in range(N_CLASSES)]
    return [rle.encode(mask) if mask.any() else "" for mask in masks]


def encode_masks(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The CPU stage after the model: each image's class bits -> an RLE string per class."""
    encoded = [encode_bits(bits) for bits in batch["bits"]]
    return {
        "image_id": batch["image_id"],
        **{
            col: np.array([strings[c] for strings in encoded], dtype=object)
            for c, col in enumerate(RLE_COLUMNS)
        },
        "error": batch["error"],
    }


def predict_in_process(
    predictor: Predictor, batch: dict[str, np.ndarray], modalities: Sequence[str]
) -> dict[str, np.ndarray]:
    """The three stages one after the other in this process, for a batch of image paths (Ray
    Data runs them apart): image_id, the RLE string of each class and error."""
    return encode_masks(predictor(read_images(batch, modalities)))


def predict_by_size(
    model: torch.nn.Module,
    paths: Sequence[Sequence[str]],
    device: torch.device,
    tta: bool = False,
    on_error: Callable[[int, SteelsegError], None] | None = None,
    amp: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Read images (a list of modality paths each), predict them a size at a time, and yield
    (their indices, (B, 4, H, W) probabilities on the device) for each size.

    An unreadable image is passed to ``on_error(index, error)`` and skipped; without
    ``on_error`` it is raised.
    """
    by_size: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for i, image_paths in enumerate(paths):
        try:
            image = images.read_stack(list(image_paths))
        except SteelsegError as e:
            if on_error is None:
                raise
            on_error(i, e)
            continue
        by_size.setdefault(image.shape[:2], []).append((i, image))
    for group in by_size.values():
        stack = np.stack([image for _, image in group])
        yield [i for i, _ in group], probability_tensor(model, stack, device, tta, amp)


def predict(
    checkpoint: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    actors: int = 1,
    tta: bool = False,
    use_gpu: bool | None = None,
    calibrated: bool = True,
    threshold: float = 0.5,
    strict: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict every image of ``images_dir`` into a submission table (``write_submission``
    writes it).

    checkpoint: a checkpoint, a run (its best checkpoint) or a sweep (its best trial's).
    use_gpu: None uses a GPU per actor when the cluster has GPUs. calibrated: use the rules
    stored with the checkpoint (``steelseg calibrate``) when there are any; otherwise, or when
    False, a plain ``threshold``. strict: an unreadable image is an error; otherwise it is
    reported and gets empty rows.

    Returns:
        ImageId, EncodedPixels, ClassId: four rows per image.
    """
    import ray

    if batch_size < 1 or actors < 1:
        raise ValueError(f"batch_size and actors must be >= 1, got {batch_size} and {actors}")
    folder = resolve_checkpoint(checkpoint)
    config = load_config(folder, check_weights=True)  # before Ray starts
    table = image_paths(images_dir, config.modalities)
    rules, how = choose_rules(folder, calibrated, threshold)
    tta_note = ", flip TTA" if tta else ""
    log.info("predicting %d images with %s (%s%s)", len(table), folder, how, tta_note)
    init_ray(actors + 1, progress_bars=progress)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    blocks = max(1, -(-len(table) // batch_size))
    with without_ray_notes():  # one per actor pool: see steelseg.cluster
        # the ignores: Ray's map_batches annotation wants a function of any batch format and
        # nothing else, leaving out fn_kwargs and batch_format
        results = (
            ray.data.from_items(table.to_dict("records"), override_num_blocks=blocks)
            .map_batches(
                read_images,  # type: ignore[arg-type]
                fn_kwargs={"modalities": config.modalities},
                batch_size=batch_size,
                num_cpus=LIGHT_STAGE_CPUS,
            )
            .map_batches(
                Predictor,
                fn_constructor_kwargs={
                    "checkpoint": folder.target,
                    "tta": tta,
                    "rules": rules.to_dict(),
                    "use_gpu": use_gpu,
                },
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_gpus=1 if use_gpu else 0,
            )
            .map_batches(encode_masks, batch_size=batch_size, num_cpus=LIGHT_STAGE_CPUS)  # type: ignore[arg-type]
            .to_pandas()
        )
    failed = results[results["error"] != ""]
    if strict and len(failed):
        raise SteelsegError(
            f"{len(failed)} unreadable image(s), first {failed['error'].iloc[0]}; nothing written"
        )
    for message in failed["error"]:
        log.warning("%s; its rows are left empty", message)
    return to_submission(results)


def choose_rules(
    checkpoint: Location, calibrated: bool = True, threshold: float = 0.5
) -> tuple[postprocess.Rules, str]:
    """The rules prediction applies, and how to name them: those stored with the checkpoint
    (``steelseg calibrate``) when ``calibrated`` and there are any, else a plain ``threshold``."""
    rules = load_rules(checkpoint) if calibrated else None
    if rules is not None:
        return rules, f"calibrated rules of {checkpoint.name}"
    return postprocess.Rules.plain(threshold), f"threshold {threshold}"


def write_submission(submission: pd.DataFrame, out: str | os.PathLike) -> Location:
    """Write a submission table as the Kaggle CSV, to a local path or a URI."""
    place = locate(out, "out")
    place.write_text(submission.to_csv(index=False))
    return place


def to_submission(results: pd.DataFrame) -> pd.DataFrame:
    """Per-image RLE columns -> ImageId, EncodedPixels, ClassId: four rows per image, in order."""
    long = results.melt(id_vars="image_id", value_vars=RLE_COLUMNS, value_name="EncodedPixels")
    long["ClassId"] = long["variable"].str[-1].astype(int)
    long = long.rename(columns={"image_id": "ImageId"}).sort_values(["ImageId", "ClassId"])
    return long[list(SUBMISSION_HEADER)].reset_index(drop=True)


def prepare(model: torch.nn.Module, device: torch.device, amp: bool = True) -> torch.nn.Module:
    """The model in eval mode on ``device``, in the layout its inputs get
    (``inputs.prefers_channels_last`` with the checkpoint's config.amp)."""
    model = model.to(device).eval()
    if inputs.prefers_channels_last(device, amp):
        return model.to(memory_format=torch.channels_last)
    return model


def device_for(use_gpu: bool | None) -> torch.device:
    """CUDA when asked for (or, with None, when there is one); asking for a missing GPU is an
    error."""
    if use_gpu and not torch.cuda.is_available():
        raise SteelsegError("a GPU was asked for, but this machine has no CUDA device")
    return torch.device("cuda" if use_gpu is not False and torch.cuda.is_available() else "cpu")
