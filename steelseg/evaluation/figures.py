"""Pictures of images and masks: one colour per class, truth above prediction (the paper's
Figure 3), as uint8 arrays that TensorBoard or a PNG writer take as they are."""

from pathlib import Path

import numpy as np

from steelseg.domain import HAS_COLUMNS, N_CLASSES, RLE_COLUMNS
from steelseg.errors import SteelsegError

CLASS_COLORS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25]], np.uint8)


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, C) uint8 image (its first channel shown in grey) and (4, H, W) masks -> (H, W, 3)."""
    grey = np.repeat(image[..., :1], 3, axis=2).astype(np.float32)
    for c in range(masks.shape[0]):
        inside = masks[c].astype(bool)
        grey[inside] = (1 - alpha) * grey[inside] + alpha * CLASS_COLORS[c]
    return grey.astype(np.uint8)


def truth_vs_prediction(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], gap: int = 4
) -> np.ndarray:
    """Each (image, truth (4, H, W), prediction (4, H, W)) as two rows, truth then prediction,
    with a white gap between samples. Returns (rows, W, 3) uint8."""
    rows = []
    for image, truth, pred in samples:
        rows += [overlay(image, truth), overlay(image, pred)]
        rows.append(np.full((gap, image.shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)


# The paper's figures as PNG files (``steelseg figures``).


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=CLASS_COLORS[c] / 255, label=f"class {c + 1}") for c in range(N_CLASSES)]
    ax.legend(handles=handles, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.0), frameon=False)


def _panels(path: Path, title: str, panels: list[tuple[str, np.ndarray]]) -> Path:
    plt = _pyplot()
    height, width = panels[0][1].shape[:2]
    fig_w = 12
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(fig_w, len(panels) * (fig_w * height / width + 0.35) + 0.9)
    )
    axes = np.atleast_1d(axes)
    for ax, (label, picture) in zip(axes, panels):
        ax.imshow(picture)
        ax.set_title(label, fontsize=9, loc="left")
        ax.axis("off")
    fig.suptitle(title)
    _legend(axes[-1])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def samples_figure(table, path: Path, per_kind: int = 3, seed: int = 0) -> Path:
    """Figure 1: images without and with defects, the defects coloured by class."""
    from steelseg.data import images, rle

    rng = np.random.default_rng(seed)
    has = table[HAS_COLUMNS].any(axis=1).to_numpy()
    panels = []
    for kind, rows in (("no defect", ~has), ("defects", has)):
        index = np.flatnonzero(rows)
        for i in rng.choice(index, min(per_kind, len(index)), replace=False):
            row = table.iloc[i]
            image = images.read_image(row["path"])
            masks = rle.decode_classes(
                [row[col] or "" for col in RLE_COLUMNS],
                *image.shape[:2],
                image_id=row["image_id"],
            )
            classes = [str(c + 1) for c in range(N_CLASSES) if masks[c].any()]
            label = f"{row['image_id']}: {kind}" + (
                f" (class {', '.join(classes)})" if classes else ""
            )
            panels.append((label, overlay(image, masks)))
    if not panels:
        raise SteelsegError("figures: no images to show")
    return _panels(path, "Steel surface samples without and with defects", panels)


def predictions_figure(
    samples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path
) -> Path:
    """Figure 3: for each (name, image, truth, prediction) truth above prediction."""
    if not samples:
        raise SteelsegError("figures: no predictions to show")
    panels = []
    for name, image, truth, pred in samples:
        panels += [
            (f"{name}: truth", overlay(image, truth)),
            (f"{name}: prediction", overlay(image, pred)),
        ]
    return _panels(path, "Predictions against ground truth", panels)


def loss_curves(logs: Path, path: Path, title: str) -> Path:
    """Figure 2: train and val loss per epoch, read from a run's TensorBoard folder (local)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs), size_guidance={"scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    if not {"loss/train", "loss/val"} <= scalars:
        raise SteelsegError(f"{logs}: no loss/train and loss/val curves")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    # logged at the global step; a resumed run logs some steps again (the last write wins)
    epochs = {e.step: e.value for e in events.Scalars("epoch")} if "epoch" in scalars else {}
    for tag, label in (("loss/train", "train"), ("loss/val", "validation")):
        by_step = {e.step: e.value for e in events.Scalars(tag)}
        steps = sorted(by_step)
        x = [epochs.get(s, s) for s in steps]
        ax.plot(x, [by_step[s] for s in steps], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("BCE + Dice loss")
    ax.set_title(f"Learning curves: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
