"""steelseg export: the ONNX file against PyTorch's prediction, read by a consumer that has
nothing but the file (docs/serving.md's own code)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from steelseg import runs
from steelseg.cli import main as steelseg
from steelseg.config import TrainConfig
from steelseg.data import synth
from steelseg.inference.postprocess import ClassRule, Rules
from steelseg.training.recipe import build_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOLERANCE = 1e-4  # probabilities, ONNX Runtime against PyTorch


def make_run(folder: Path, seed: int = 0, **changes) -> Path:
    """A run folder with one checkpoint (epoch 2) of an untrained model of ``changes``'s
    config: what export reads of a run, without training one."""
    config = TrainConfig(**changes)
    torch.manual_seed(seed)
    state = {"model": build_model(config).state_dict(), "config": config.to_dict()}
    runs.write_state(folder / "epoch_0002", {**state, "epoch": 2, "metrics": {}})
    return folder


def docs_consumer() -> dict:
    """The functions of docs/serving.md's consumer (its first Python block): onnx_probabilities
    and apply_rules, which read nothing but the file."""
    docs = (Path(__file__).parents[2] / "docs" / "serving.md").read_text()
    namespace: dict = {}
    exec(docs.split("```python\n", 1)[1].split("```", 1)[0], namespace)
    return namespace


CONSUMER = docs_consumer()


def onnx_probabilities(path: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """Each (H, W, C) uint8 image -> (4, H, W) probabilities, by the docs' consumer."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [CONSUMER["onnx_probabilities"](session, image) for image in images]


def torch_probabilities(checkpoint, images: list[np.ndarray]) -> list[np.ndarray]:
    """Prediction's probabilities (steelseg.inference.predict) in float32, an image at a time."""
    from steelseg.inference.predict import prepare, probabilities

    model, _, _ = runs.load_checkpoint(runs.resolve_checkpoint(checkpoint))
    cpu = torch.device("cpu")
    model = prepare(model, cpu, amp=False)
    return [probabilities(model, image[None], cpu, amp=False)[0] for image in images]


def threshold_between(probs: np.ndarray, quantile: float, gap: float = 2e-6) -> float:
    """A threshold near ``quantile`` of the probabilities with no pixel within ``gap / 2`` of
    it: a difference of ONNX Runtime's below that (1.5e-7 measured) cannot move a pixel across
    it."""
    values = np.sort(probs)
    i = int(quantile * (len(values) - 1))
    while values[i + 1] - values[i] <= gap:
        i += 1
    return float(values[i] + values[i + 1]) / 2


def rules_with_masks(probs: list[np.ndarray]) -> Rules:
    """Rules under which the untrained model marks about 5% of the pixels, with components,
    areas and a gate at work."""
    flat = np.concatenate([p.reshape(4, -1) for p in probs], axis=1)
    thresholds = [threshold_between(flat[c], 0.95) for c in range(4)]
    peaks = np.sort(np.stack([p.reshape(4, -1).max(axis=1) for p in probs]), axis=0)
    gate = float(peaks[len(probs) // 2, 3] + peaks[len(probs) // 2 - 1, 3]) / 2  # half the images
    classes = (
        ClassRule(thresholds[0]),
        ClassRule(thresholds[1], min_component=20),
        ClassRule(thresholds[2], min_area=500),
        ClassRule(thresholds[3], gate=max(gate, thresholds[3] + 1e-6)),
    )
    return Rules(classes, (256, 1600))


def masks(rules: Rules, probs: list[np.ndarray]) -> list[np.ndarray]:
    return [rules.apply(p) for p in probs]


FUSED = ["visible", "ir", "uv"]


@pytest.fixture(scope="module")
def parity_images(real_dir) -> list[np.ndarray]:
    """The three real 256x1600 images and a synthetic one of a size that is no multiple of 32
    (the consumer pads it), each with two more channels for the fused modalities (the real
    images have none: a shifted and an inverted copy of their grey)."""
    real = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(real_dir.glob("*/*.jpg"))]
    made = synth.make_image(synth.SynthSpec(256, 1600, seed=3), 1)[0]["visible"][:250, :390]
    images = [*real, np.repeat(made[..., None], 3, axis=2)]
    return [np.dstack([i, np.roll(i[..., 0], 7, axis=1), 255 - i[..., 0]]) for i in images]


def test_the_fused_paper_network_with_its_gate_and_rules_matches_pytorch_at_full_size(
    parity_images, tmp_path, capsys
):
    run = make_run(tmp_path / "run", presence_head=True, head_prior=0.3, modalities=FUSED)
    reference = torch_probabilities(run, parity_images)
    rules = rules_with_masks(reference)
    runs.save_rules(runs.resolve_checkpoint(run), rules)  # as calibrate stores them
    out = tmp_path / "model.onnx"
    assert steelseg(["export", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: arch paper")

    import onnx

    from steelseg.inference.export import read_metadata

    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    found = onnx_probabilities(out, parity_images)
    for ours, theirs in zip(found, reference):
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() < TOLERANCE
    metadata = read_metadata(out)
    stored = Rules.from_dict(json.loads(metadata["rules"]))
    assert stored == rules and metadata["rules_source"] == "calibrated rules of epoch_0002"
    assert json.loads(metadata["class_ids"]) == [1, 2, 3, 4]
    assert json.loads(metadata["modalities"]) == FUSED
    ours, theirs = masks(stored, found), masks(rules, reference)
    by_the_docs = [CONSUMER["apply_rules"](p, json.loads(metadata["rules"])) for p in found]
    for a, b, c in zip(ours, theirs, by_the_docs):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)  # the metadata's rules, applied without steelseg
    kept = np.array([m.reshape(4, -1).any(axis=1) for m in theirs])
    assert kept.any(axis=0).all() and not kept[:, 3].all()  # every class found, the gate shut


@pytest.mark.parametrize(
    ("arch", "modalities", "presence"),
    [
        # smp's network with fusion and the gate (the paper's: the full-size test above; early
        # fusion is the same graph with more input channels, so a visible-only network differs
        # in its first layers' width alone); the other smp decoders go through the same SmpNet
        # wrapper (cut from the suite for its time: ~8 s each)
        ("unet-resnet18", ["visible", "ir"], True),
    ],
)
def test_smp_networks_export_with_fusion_and_a_dynamic_batch_and_size(
    arch, modalities, presence, tmp_path
):
    from steelseg.inference.export import export_onnx

    run = make_run(tmp_path / "run", arch=arch, modalities=modalities, presence_head=presence)
    out = tmp_path / "model.onnx"
    _, metadata = export_onnx(run, out)
    assert json.loads(metadata["modalities"]) == modalities
    rng = np.random.default_rng(0)
    channels = 3 + len(modalities) - 1
    images = [rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
              for h, w in ((64, 320), (64, 320), (96, 200))]  # fmt: skip
    for ours, theirs in zip(onnx_probabilities(out, images), torch_probabilities(run, images)):
        assert np.abs(ours - theirs).max() < TOLERANCE


def test_pspnet_exports_at_a_fixed_size_only(tmp_path, capsys):
    import onnxruntime as ort

    run = make_run(tmp_path / "run", arch="pspnet-resnet18")
    out = tmp_path / "psp.onnx"
    assert steelseg(["export", str(run), "--out", str(out)]) == 1
    assert "give the image size (--image-size 256x1600)" in capsys.readouterr().err
    assert steelseg(["export", str(run), "--out", str(out), "--image-size", "64x320"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape[1:] == [3, 64, 320] and isinstance(shape[0], str)  # the batch stays dynamic
    images = list(np.random.default_rng(1).integers(0, 255, (3, 64, 320, 3), dtype=np.uint8))
    for ours, theirs in zip(onnx_probabilities(out, images), torch_probabilities(run, images)):
        assert np.abs(ours - theirs).max() < TOLERANCE


def test_export_errors_are_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    out = tmp_path / "model.onnx"
    out.write_text("keep me")
    cases = {
        (str(run), "--out", str(out)): "already exists (--overwrite replaces it)",
        (str(tmp_path / "none"), "--out", str(tmp_path / "x.onnx")): "no such checkpoint",
        (str(run), "--out", str(tmp_path / "y.onnx"), "--image-size", "64x300"): (
            "height and width must be multiples of 32"
        ),
    }
    for argv, message in cases.items():
        assert steelseg(["export", *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert out.read_text() == "keep me"
    with pytest.raises(SystemExit):
        steelseg(["export", str(run), "--out", str(out), "--image-size", "256 by 1600"])
