"""Rare-class oversampling: hand-computed repeats, and a table whose epoch meets the share."""

import numpy as np
import pandas as pd
import pytest

from steelseg.config import TrainConfig
from steelseg.data.sampling import oversample, rare_repeats
from steelseg.domain import HAS_COLUMNS
from steelseg.errors import SteelsegError


def test_images_of_rare_classes_are_repeated_up_to_the_share():
    presence = np.zeros((20, 4), dtype=bool)
    presence[0, 0] = True  # class 1 on 1 of 20 images
    presence[1:3, 1] = True  # class 2 on 2
    presence[2, 0] = True  # image 2 has classes 1 and 2: the larger repeat
    presence[3:13, 2] = True  # class 3 on 10: not rare at share 0.2
    # share 0.2 of 20 = 4 images: class 1 (2 images) x2, class 2 (2 images) x2; class 4 absent
    assert rare_repeats(presence, 0.2).tolist() == [2, 2, 2] + [1] * 17
    # share 0.5 = 10 images: class 1 x5, class 2 x5, class 3 on exactly 10: once
    assert rare_repeats(presence, 0.5).tolist() == [5, 5, 5] + [1] * 17
    assert rare_repeats(presence, 0.0).tolist() == [1] * 20


def test_oversampled_epoch_has_every_class_on_at_least_the_share_of_the_images():
    rng = np.random.default_rng(0)
    presence = rng.random((200, 4)) < [0.07, 0.02, 0.4, 0.06]  # about the real data's shares
    table = pd.DataFrame(presence, columns=HAS_COLUMNS).assign(image_id=np.arange(200))
    epoch = oversample(table, 0.1)
    counts = epoch[HAS_COLUMNS].sum()
    assert (counts >= 0.1 * 200).all(), counts  # images of class c in the epoch, of 200
    assert counts["has_2"] < table["has_2"].sum() * 6 and len(epoch) < 1.3 * len(table)
    assert set(epoch["image_id"]) == set(table["image_id"])  # every image still there
    assert oversample(table, 0.0) is table
    with pytest.raises(SteelsegError, match="rare_share must be in"):
        TrainConfig(rare_share=1.0)
