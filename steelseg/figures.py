"""Pictures of images and masks: one colour per class, truth above prediction (the paper's
Figure 3), as uint8 arrays that TensorBoard or a PNG writer take as they are."""

import numpy as np

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
