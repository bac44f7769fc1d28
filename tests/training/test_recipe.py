"""A rank's training built and restored without Ray (``recipe.build_training``), the GPU check's
phases on the CPU, the paper network's initialisation and AdamW's parameter groups."""

import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from steelseg import runs
from steelseg.config import TrainConfig
from steelseg.errors import SteelsegError
from steelseg.training import epoch, recipe

ROOT = Path(__file__).parents[2]
CPU = torch.device("cpu")


def bar_batches(n: int, seed: int = 0) -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import batches

    return batches(n, 2, 32, 64, seed)


def trained(config: TrainConfig, training: recipe.Training, data: list) -> None:
    epoch.train_one_epoch(
        training.model, data, recipe.build_loss(config), training.optimizer,
        training.scheduler, CPU, channels_last=False,
    )  # fmt: skip


def checkpoint(training: recipe.Training, config: TrainConfig, epochs: int) -> dict:
    """The state the worker saves, written and read back through ``runs``."""
    state = {
        "model": training.model.state_dict(), "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(), "scaler": None, "epoch": epochs,
        "global_step": 7 * epochs, "optimizer_steps": training.scheduler.last_epoch,
        "config": config.to_dict(), "metrics": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        runs.write_state(folder, state)
        return runs.read_state(folder)


@pytest.mark.filterwarnings("ignore:.*to a meta parameter")
def test_a_restore_puts_the_optimizer_state_where_the_model_is():
    """The model is on its device before the optimizer loads its state: loaded while the
    model was on the CPU, AdamW's moments stayed there and a GPU's first step failed. ``meta``
    stands in for the GPU."""
    config = TrainConfig(epochs=2, warmup_steps=1)
    first = recipe.build_training(config, CPU, steps_per_epoch=2)
    trained(config, first, bar_batches(2))
    state = checkpoint(first, config, epochs=1)
    restored = recipe.build_training(config, torch.device("meta"), 2, state=state)
    moments = [
        value.device.type
        for per_param in restored.optimizer.state.values()
        for key, value in per_param.items()
        if key != "step"  # AdamW keeps its step count on the CPU by design
    ]
    assert moments and set(moments) == {"meta"}
    assert {p.device.type for p in restored.model.parameters()} == {"meta"}
    assert (restored.epoch, restored.global_step, restored.optimizer_steps) == (1, 7, 2)


def test_a_restored_run_trains_on_exactly_as_the_uninterrupted_one():
    config = TrainConfig(epochs=2, warmup_steps=1)
    data = bar_batches(2)
    whole = recipe.build_training(config, CPU, steps_per_epoch=2)
    trained(config, whole, data)
    state = checkpoint(whole, config, epochs=1)
    trained(config, whole, data)
    resumed = recipe.build_training(config, CPU, steps_per_epoch=2, state=state)
    assert resumed.scheduler.last_epoch == 2
    trained(config, resumed, data)
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, msg=name)


def test_sync_bn_needs_gpus_and_replaces_every_batchnorm_on_more_than_one_rank():
    with pytest.raises(SteelsegError, match="config sync_bn needs use_gpu"):
        TrainConfig(sync_bn=True)
    config = TrainConfig(sync_bn=True, use_gpu=True)
    synced = recipe.build_training(config, CPU, 1, world_size=2).model
    kinds = {type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {nn.SyncBatchNorm}
    alone = recipe.build_training(config, CPU, 1, world_size=1).model  # nothing to sync with
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in alone.modules())


def test_the_paper_networks_initialisation():
    """He initialisation of the decoder, every residual block's last BatchNorm at zero (each
    block starts as the identity) and the head's bias at the prior's log-odds."""
    torch.manual_seed(0)
    config = TrainConfig(head_prior=0.02)
    model = recipe.build_model(config)
    blocks = [b for layer in ("layer1", "layer2", "layer3", "layer4")
              for b in getattr(model.encoder, layer)]  # fmt: skip
    assert len(blocks) == 8 and all((b.bn2.weight == 0).all() for b in blocks)
    assert all((b.bn1.weight == 1).all() for b in blocks)
    bias = model.conv_last.bias
    assert torch.allclose(bias, torch.full_like(bias, math.log(0.02 / 0.98)))
    conv = model.conv_up1[0]  # fan_out He: std = sqrt(2 / (out_channels * k * k))
    expected = math.sqrt(2 / (conv.out_channels * 9))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert (conv.bias == 0).all()


def test_adamw_decays_weights_but_not_biases_and_norms():
    config = TrainConfig(weight_decay=0.05)
    model = recipe.build_model(config)
    decay, no_decay = recipe.build_optimizer(config, model).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.conv_last.bias) in ids and id(model.encoder.bn1.weight) in ids
    assert id(model.encoder.conv1.weight) in {id(p) for p in decay["params"]}
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"])


def test_the_gpu_check_runs_every_phase_on_the_cpu_without_ray():
    command = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--size", "32x64",
               "--batch", "2", "--steps", "2"]  # fmt: skip
    probe = "import runpy, sys; sys.argv = {argv!r}; runpy.run_path({path!r}, run_name='__main__')"
    # run as a script, with Ray made unimportable: a lent GPU machine has no Ray
    code = "import sys; sys.modules['ray'] = None; " + probe.format(
        argv=command[1:], path=command[1]
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    phases = [line.split()[0] for line in done.stdout.splitlines() if " ok " in line]
    assert phases == ["build", "train", "save", "restore", "train", "predict"]
    assert "optimizer state on cpu" in done.stdout
    assert done.stdout.strip().endswith("gpu_check: all phases ok")
    assert np.isfinite(float(done.stdout.split("loss ")[1].split()[0]))


@pytest.mark.parametrize(("max_steps", "total"), [(0, 30), (7, 7), (100, 30)])
def test_the_schedule_spans_max_steps_when_they_end_the_run_first(max_steps, total):
    config = TrainConfig(epochs=3, max_steps=max_steps, warmup_steps=2)
    assert recipe.total_steps(config, steps_per_epoch=10) == total
    training = recipe.build_training(config, torch.device("cpu"), steps_per_epoch=10)
    for _ in range(total):
        training.optimizer.step()
        training.scheduler.step()
    # at the end of the run the learning rate is at the schedule's floor, 1% of the peak
    assert training.scheduler.get_last_lr()[0] == pytest.approx(0.01 * config.lr)


def test_max_steps_below_zero_is_a_config_error():
    with pytest.raises(SteelsegError, match="config max_steps must be >= 0, got -1"):
        TrainConfig(max_steps=-1)
