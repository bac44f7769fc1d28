"""How often an epoch sees each training image: images of rare classes repeated, so that every
class is on at least a share of as many images as the training set has. In the real data class
2 is on about 2% of the images and class 1 on 7% (``../shared/DATA.md``); seen that rarely, a
model learns to call them absent. Free of Ray: the Ray Data pipeline and the benchmarks use it
alike.
"""

import numpy as np
import pandas as pd

from steelseg.domain import HAS_COLUMNS


def rare_repeats(presence: np.ndarray, share: float) -> np.ndarray:
    """Times each image is seen an epoch.

    A class on n of the N images, with n below ``share * N``, has its images repeated
    ``ceil(share * N / n)`` times; an image takes the largest repeat among its classes, and one
    without a rare class is seen once.

    Shape:
        presence: (N, C) bool, class c on image i -> (N,) int.
    """
    n_images = len(presence)
    counts = presence.sum(axis=0)
    per_class = np.ones(presence.shape[1], dtype=int)
    rare = (counts > 0) & (counts < share * n_images)
    per_class[rare] = np.ceil(share * n_images / counts[rare]).astype(int)
    return np.where(presence, per_class, 1).max(axis=1, initial=1)


def oversample(table: pd.DataFrame, share: float) -> pd.DataFrame:
    """The catalog's training rows, each repeated ``rare_repeats`` times (``share`` 0: as is)."""
    if not share:
        return table
    repeats = rare_repeats(table[HAS_COLUMNS].to_numpy(dtype=bool), share)
    return table.loc[table.index.repeat(repeats)].reset_index(drop=True)
