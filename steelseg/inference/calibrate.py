"""Calibration: search the post-processing rules per class on a run's validation split and store
them with the checkpoint, where prediction finds them."""

import os

import numpy as np

from steelseg.data import images, rle
from steelseg.domain import RLE_COLUMNS
from steelseg.inference.postprocess import Calibration, Rules
from steelseg.inference.predict import device_for, predict_by_size, prepare
from steelseg.runs import load_checkpoint, read_split, resolve_checkpoint, save_rules
from steelseg.storage import Location


def calibrate(
    checkpoint: str | os.PathLike,
    *,
    batch_size: int = 8,
    tta: bool = False,
    use_gpu: bool | None = None,
) -> tuple[Rules, dict, Location]:
    """Search the rules on the validation split of the checkpoint's run (full-size images, read
    and predicted as prediction does) and store them with the checkpoint.

    Returns:
        The rules, the report (Kaggle Dice before and after, per class, the all-empty baseline)
        and the checkpoint folder they were stored in.

    Raises:
        SteelsegError: no checkpoint, no split, or an unreadable validation image.
    """
    folder = resolve_checkpoint(checkpoint)
    model, config, _ = load_checkpoint(folder)
    val = read_split(folder.parent, "val")
    device = device_for(use_gpu)
    model = prepare(model, device, config.amp)
    columns = images.path_columns(config.modalities)
    search = Calibration()
    empty = []
    for start in range(0, len(val), batch_size):
        rows = val.iloc[start : start + batch_size].reset_index(drop=True)
        paths = [[row[c] for c in columns] for _, row in rows.iterrows()]
        for indices, probs in predict_by_size(model, paths, device, tta, amp=config.amp):
            for i, p in zip(indices, probs.cpu().numpy()):
                row = rows.iloc[i]
                strings = [row[col] or "" for col in RLE_COLUMNS]
                truth = rle.decode_classes(strings, *p.shape[1:], image_id=row["image_id"])
                search.add(p, truth)
                empty.append(truth.reshape(len(strings), -1).max(axis=1) == 0)
    rules, report = search.result()
    report["empty_baseline"] = float(np.mean(empty))
    report["tta"] = tta
    report["checkpoint"] = folder.target
    save_rules(folder, rules, report)
    return rules, report, folder


def calibration_report(checkpoint: str, use_gpu: bool) -> dict:
    """``calibrate`` for a Ray task: the report, with the rules as a dict."""
    rules, report, _ = calibrate(checkpoint, use_gpu=use_gpu)
    return {**report, "rules": rules.to_dict()}
