"""steelseg: distributed training of steel-defect segmentation models on Ray.

The parts live in packages (``data``, ``model``, ``training``, ``inference``, ``evaluation``);
a run's files in ``steelseg.runs``; the front end in ``steelseg.cli``. What a user calls is
re-exported here, imported on first use so that ``import steelseg`` stays light.
"""

import importlib

from steelseg.errors import RLEError, SteelsegError

_PUBLIC = {
    "TrainConfig": "steelseg.config",
    "fit": "steelseg.training.fit",
    "FitResult": "steelseg.training.fit",
    "sweep": "steelseg.training.sweep",
    "predict": "steelseg.inference.predict",
    "write_submission": "steelseg.inference.predict",
    "calibrate": "steelseg.inference.calibrate",
    "export_onnx": "steelseg.inference.export",
    "score_submission": "steelseg.evaluation.score",
    "load_checkpoint": "steelseg.runs",
    "best_checkpoint": "steelseg.runs",
    "read_history": "steelseg.runs",
}

__all__ = ["RLEError", "SteelsegError", *_PUBLIC]
__version__ = "0.1.0"  # the one place: pyproject.toml reads it; CHANGELOG.md says what it holds


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'steelseg' has no attribute {name!r}")
