"""steelseg: distributed training of steel-defect segmentation models on Ray."""

from steelseg.errors import RLEError, SteelsegError

__all__ = ["RLEError", "SteelsegError"]
__version__ = "0.1.0"
