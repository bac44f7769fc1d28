"""A trained model as one ONNX file: the network with its presence gate and the sigmoid in the
graph (probabilities out), batch, height and width dynamic (height and width multiples of 32),
and in the file's metadata all that a consumer needs besides: the class ids, the input layout
and normalisation, the padding rule and the post-processing rules (calibrated or a plain
threshold). docs/serving.md shows a consumer that reads nothing but the file.

The graph is float32 whatever the checkpoint's amp (bf16 is a runtime's choice, not the file's).
"""

import json
import logging
import os

import torch
from torch import nn

from steelseg import __version__
from steelseg.config import TrainConfig
from steelseg.data.images import in_channels
from steelseg.domain import CLASS_IDS, ENCODER_STRIDE, N_CLASSES
from steelseg.errors import SteelsegError, one_line
from steelseg.inference.predict import choose_rules
from steelseg.model import inputs
from steelseg.runs import load_checkpoint, resolve_checkpoint
from steelseg.storage import Location, locate

log = logging.getLogger(__name__)

OPSET = 18
INPUT, OUTPUT = "image", "probabilities"
PADDING = (
    f"bottom and right, repeating the edge pixels (numpy.pad mode 'edge'), to multiples of "
    f"{ENCODER_STRIDE}; the probabilities are cropped back to the image"
)
RULES_USE = (
    "per class: a pixel is the class where its probability > threshold; the class is dropped "
    "from an image whose highest probability of it is < gate; 8-connected components of fewer "
    "than min_component pixels are removed, then a mask of fewer than min_area pixels is "
    "dropped; min_area and min_component were set at image_size (height, width) and scale "
    "with an image's pixel count"
)
# decoders whose pooling has no ONNX form for inputs of any size (PSPNet's adaptive pyramid
# pooling: exported with dynamic sizes, onnxruntime fails on its indices)
FIXED_SIZE_DECODERS = ("pspnet",)


class Probabilities(nn.Module):
    """A model's probabilities as prediction computes them: the sigmoid of its logits in
    float32 (with a presence head, of the gated logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x).float())


def export_onnx(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    calibrated: bool = True,
    threshold: float = 0.5,
) -> tuple[Location, dict[str, str]]:
    """Write the model of ``checkpoint`` (a checkpoint, a run's best, a sweep's best) to
    ``out`` (a path or URI) as ONNX, checked with ``onnx.checker``.

    image_size: fix height and width (multiples of 32) instead of leaving them dynamic; PSPNet
    needs it. calibrated, threshold: the rules written to the metadata, chosen as predict
    chooses them.

    Returns:
        Where the file is, and its metadata.

    Raises:
        SteelsegError: no checkpoint or a broken one, a size that is no multiple of 32, or a
            PSPNet without ``image_size``.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ModuleNotFoundError as e:
        message = f"steelseg export needs {e.name}: pip install 'steelseg[onnx]'"
        raise SteelsegError(message) from None

    folder = resolve_checkpoint(checkpoint)
    model, config, state = load_checkpoint(folder)
    check_size(config.arch, image_size)
    rules, how = choose_rules(folder, calibrated, threshold)
    log.info("exporting %s (%s)", folder, how)
    channels = in_channels(config.modalities)
    example = torch.zeros(2, channels, *(image_size or (2 * ENCODER_STRIDE, 3 * ENCODER_STRIDE)))
    program = torch.onnx.export(
        Probabilities(model).eval(),
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=(dynamic_dims(image_size),),
        opset_version=OPSET,
        verbose=False,
    )
    assert program is not None  # dynamo=True always returns one
    proto = program.model_proto
    metadata = describe(config, state.get("epoch"), folder, rules.to_dict(), how, image_size)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"steelseg {config.arch} from {folder}: {OUTPUT} (N, 4, H, W) of {INPUT}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug of the exporter's or ours, not the user's
        raise RuntimeError(f"the exported graph fails onnx.checker: {one_line(e)}") from e
    place = locate(out, "out")
    place.write_bytes(proto.SerializeToString())
    return place, metadata


def check_size(arch: str, image_size: tuple[int, int] | None) -> None:
    if image_size is None:
        if arch.partition("-")[0] in FIXED_SIZE_DECODERS:
            raise SteelsegError(
                f"arch {arch}: its pyramid pooling has no ONNX form for inputs of any size; "
                "give the image size (--image-size 256x1600)"
            )
        return
    if any(side % ENCODER_STRIDE for side in image_size):
        raise SteelsegError(
            f"image size {image_size[0]}x{image_size[1]}: height and width must be multiples of "
            f"{ENCODER_STRIDE} (the padded size the graph takes)"
        )


def dynamic_dims(image_size: tuple[int, int] | None) -> dict:
    """The input's dynamic dimensions: the batch, and without a fixed size height and width,
    each a multiple of the network's stride."""
    dims = {0: torch.export.Dim("batch")}
    if image_size is None:
        dims[2] = ENCODER_STRIDE * torch.export.Dim("rows")
        dims[3] = ENCODER_STRIDE * torch.export.Dim("cols")
    return dims


def describe(
    config: TrainConfig,
    epoch: int | None,
    folder: Location,
    rules: dict,
    how: str,
    image_size: tuple[int, int] | None,
) -> dict[str, str]:
    """The file's metadata: strings, JSON where a value has structure."""
    channels = in_channels(config.modalities)
    mean, std = inputs.normalisation_values(channels)
    size = f"{image_size[0]}x{image_size[1]}" if image_size else f"multiples of {ENCODER_STRIDE}"
    return {
        "steelseg_version": __version__,
        "class_ids": json.dumps(list(CLASS_IDS)),
        "input_layout": (
            f"{INPUT}: float32 (N, C, H, W); C = {channels}: the visible image's R, G, B, then "
            "one grey channel per further modality, in the order of modalities"
        ),
        "modalities": json.dumps(list(config.modalities)),
        "normalisation": json.dumps(
            {"formula": "(pixel / 255 - mean[c]) / std[c]", "mean": list(mean), "std": list(std)}
        ),
        "input_size": size,
        "padding": PADDING,
        "output": f"{OUTPUT}: float32 (N, {N_CLASSES}, H, W), channel k is class_ids[k]",
        "rules": json.dumps(rules),
        "rules_source": how,
        "rules_use": RULES_USE,
        "arch": config.arch,
        "presence_head": json.dumps(config.presence_head),
        "checkpoint": str(folder),
        "epoch": json.dumps(epoch),
    }


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """An ONNX file's metadata, as ``export_onnx`` wrote it."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}
