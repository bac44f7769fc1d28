"""Batch prediction with Ray Data: a pool of actors holds the model, each image is predicted at its
full size (padded to a multiple of 32), optionally averaged over flips, post-processed by the
checkpoint's calibrated rules and written as a Kaggle submission (four rows per image).
"""

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from steelseg.data import catalog, images, rle
from steelseg.errors import SteelsegError
from steelseg.inference import postprocess
from steelseg.paths import local_path
from steelseg.runs import CHECKPOINT_FILE, best_checkpoint, load_checkpoint, load_config
from steelseg.training import engine

SUBMISSION_COLUMNS = ["ImageId", "EncodedPixels", "ClassId"]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint, a training run (its best checkpoint) or a Tune sweep
    (its best trial's best checkpoint).

    Raises:
        SteelsegError: the path is none of these.
    """
    path = local_path(path, "checkpoint").resolve()
    if (path / CHECKPOINT_FILE).is_file():
        return path
    if (path / "best_checkpoint.txt").is_file():
        return resolve_checkpoint((path / "best_checkpoint.txt").read_text().strip())
    if path.is_dir() and any(path.glob(f"epoch_*/{CHECKPOINT_FILE}")):
        return best_checkpoint(path)
    if not path.exists():
        raise SteelsegError(f"{path}: no such checkpoint, run or sweep")
    raise SteelsegError(
        f"{path}: not a checkpoint (no {CHECKPOINT_FILE}), a run (no epoch_*/) or a finished "
        "sweep (no best_checkpoint.txt)"
    )


def flips(tta: bool) -> list[tuple[int, ...]]:
    """Dims to flip for each view: none, and with TTA also horizontal and vertical."""
    return [(), (3,), (2,)] if tta else [()]


def probabilities(
    model: torch.nn.Module, batch: np.ndarray, device: torch.device, tta: bool = False
) -> np.ndarray:
    """(B, H, W, C) uint8 images of one size -> (B, 4, H, W) float32 probabilities, any H, W."""
    return probability_tensor(model, batch, device, tta).cpu().numpy()


@torch.no_grad()
def probability_tensor(
    model: torch.nn.Module, batch: np.ndarray, device: torch.device, tta: bool = False
) -> torch.Tensor:
    """``probabilities`` left on the device. Each flipped view is padded on its own, so TTA is
    exactly the mean of predicting the flipped images."""
    x, _ = engine.to_inputs(
        {"image": torch.from_numpy(batch), "mask": torch.zeros(batch.shape[:3], dtype=torch.uint8)},
        device,
        channels_last=device.type == "cuda",
    )
    total = None
    for dims in flips(tta):
        view = x.flip(dims) if dims else x
        with engine.autocast(device, enabled=True):
            logits = engine.forward_padded(model, view)
        probs = torch.sigmoid(logits.float())
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    return total / len(flips(tta))


def image_paths(images_dir: Path, modalities: Sequence[str]) -> pd.DataFrame:
    """One row per image in ``images_dir``: image_id and a path per modality; an extra modality
    lives in the sibling folder ``<images_dir>_<modality>`` (train_images -> train_images_ir)."""
    names = catalog.list_images(images_dir)
    if not names:
        raise SteelsegError(f"{images_dir}: no .jpg images")
    table = pd.DataFrame({"image_id": names, "path": [str(images_dir / n) for n in names]})
    for m in modalities[1:]:
        folder = images_dir.with_name(f"{images_dir.name}_{m}")
        table[f"path_{m}"] = [str(folder / n) for n in names]
    return table


class Predictor:
    """A Ray Data actor: the model loaded once, then batches of image paths -> RLE strings."""

    def __init__(
        self,
        checkpoint: str,
        modalities: Sequence[str],
        tta: bool,
        rules: dict | None,
        use_gpu: bool,
    ):
        self.device = device_for(use_gpu)
        self.model = prepare(load_checkpoint(checkpoint)[0], self.device)
        self.columns = images.path_columns(list(modalities))
        self.tta = tta
        self.rules = postprocess.Rules.from_dict(rules) if rules else postprocess.Rules.plain()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        encoded = [[""] * n for _ in range(postprocess.N_CLASSES)]
        errors = [""] * n
        by_size: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        for i in range(n):
            try:
                image = images.read_stack([batch[col][i] for col in self.columns])
            except SteelsegError as e:
                errors[i] = str(e)
                continue
            by_size.setdefault(image.shape[:2], []).append((i, image))
        for group in by_size.values():
            stack = np.stack([im for _, im in group])
            probs = probability_tensor(self.model, stack, self.device, self.tta)
            masks, present = self.rules.apply_batch(probs)
            for (i, _), image_masks, image_present in zip(group, masks, present):
                for c in np.flatnonzero(image_present):
                    encoded[c][i] = rle.encode(image_masks[c])
        return {
            "image_id": batch["image_id"],
            **{f"rle_{c + 1}": np.array(encoded[c], dtype=object) for c in range(4)},
            "error": np.array(errors, dtype=object),
        }


def predict(
    checkpoint: str | os.PathLike,
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
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
    """Predict every image of ``images_dir`` and write the submission CSV to ``out``.

    use_gpu: None uses a GPU per actor when the cluster has GPUs. calibrated: use the rules
    stored with the checkpoint (``steelseg calibrate``) when there are any; otherwise, or when
    False, a plain ``threshold``. strict: an unreadable image is an error and nothing is written;
    otherwise it is reported and gets empty rows.

    Returns the submission table.
    """
    import ray

    if batch_size < 1 or actors < 1:
        raise SteelsegError("--batch-size and --actors must be >= 1")
    folder = resolve_checkpoint(checkpoint)
    config = load_config(folder)
    table = image_paths(local_path(images_dir, "images").resolve(), config.modalities)
    out = local_path(out, "out")
    rules = postprocess.load(folder) if calibrated else None
    how = f"calibrated rules of {postprocess.RULES_FILE}" if rules else f"threshold {threshold}"
    rules = rules or postprocess.Rules.plain(threshold)
    tta_note = ", flip TTA" if tta else ""
    print(f"predicting {len(table)} images with {folder} ({how}{tta_note})", flush=True)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    results = (
        ray.data.from_items(
            table.to_dict("records"), override_num_blocks=max(1, -(-len(table) // batch_size))
        )
        .map_batches(
            Predictor,
            fn_constructor_kwargs={
                "checkpoint": str(folder),
                "modalities": config.modalities,
                "tta": tta,
                "rules": rules.to_dict(),
                "use_gpu": use_gpu,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if use_gpu else 0,
        )
        .to_pandas()
    )
    failed = results[results["error"] != ""]
    for message in failed["error"]:
        print(f"steelseg: warning: {message}; its rows are left empty", file=sys.stderr)
    if strict and len(failed):
        raise SteelsegError(
            f"{len(failed)} unreadable image(s), first {failed['error'].iloc[0]}; nothing written"
        )
    submission = to_submission(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    submission.to_csv(out, index=False)
    found = (submission["EncodedPixels"] != "").sum()
    print(
        f"wrote {out}: {len(results)} images, {found} class masks found, {len(failed)} unreadable"
    )
    return submission


def to_submission(results: pd.DataFrame) -> pd.DataFrame:
    """Per-image RLE columns -> ImageId, EncodedPixels, ClassId: four rows per image, in order."""
    long = results.melt(
        id_vars="image_id", value_vars=[f"rle_{c}" for c in range(1, 5)], value_name="EncodedPixels"
    )
    long["ClassId"] = long["variable"].str[-1].astype(int)
    long = long.rename(columns={"image_id": "ImageId"}).sort_values(["ImageId", "ClassId"])
    return long[SUBMISSION_COLUMNS].reset_index(drop=True)


def prepare(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in eval mode on ``device``, channels_last on CUDA like its inputs."""
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def device_for(use_gpu: bool | None) -> torch.device:
    """CUDA when asked for (or, with None, when there is one); asking for a missing GPU is an
    error."""
    if use_gpu and not torch.cuda.is_available():
        raise SteelsegError("--use-gpu: no CUDA device on this machine")
    return torch.device("cuda" if use_gpu is not False and torch.cuda.is_available() else "cpu")


def calibrate(
    checkpoint: str | os.PathLike,
    *,
    batch_size: int = 8,
    tta: bool = False,
    use_gpu: bool | None = None,
) -> tuple[postprocess.Rules, dict]:
    """Search the post-processing rules per class on the run's validation split (its
    ``split.parquet``, full-size images) and store them with the checkpoint.

    Raises:
        SteelsegError: no checkpoint, no split, or an unreadable validation image.
    """
    folder = resolve_checkpoint(checkpoint)
    model, config, _ = load_checkpoint(folder)
    split_file = folder.parent / "split.parquet"
    if not split_file.is_file():
        raise SteelsegError(f"{folder.parent}: no split.parquet (the run's validation split)")
    table = catalog.read(split_file)
    val = table[table["split"] == "val"].reset_index(drop=True)
    device = device_for(use_gpu)
    model = prepare(model, device)
    columns = images.path_columns(config.modalities)
    search = postprocess.Calibration()
    empty = []
    for start in range(0, len(val), batch_size):
        rows = val.iloc[start : start + batch_size]
        stack = [images.read_stack([row[c] for c in columns]) for _, row in rows.iterrows()]
        if len({image.shape for image in stack}) == 1:
            probs = probabilities(model, np.stack(stack), device, tta)
        else:
            probs = [probabilities(model, image[None], device, tta)[0] for image in stack]
        for (_, row), image, p in zip(rows.iterrows(), stack, probs):
            rles = [row[f"rle_{c}"] or "" for c in catalog.CLASS_IDS]
            height, width = image.shape[:2]
            truth = rle.decode_classes(rles, height, width, image_id=row["image_id"])
            search.add(p, truth)
            empty.append(truth.reshape(len(rles), -1).max(axis=1) == 0)
    rules, report = search.result()
    report["empty_baseline"] = float(np.mean(empty))
    report["tta"] = tta
    report["checkpoint"] = str(folder)
    postprocess.save(rules, folder, report)
    return rules, report
