"""The training step and the evaluation without Ray: padding, gradient accumulation, the
learning-rate schedule and the class bits."""

import numpy as np
import pytest
import torch
from torch import nn

from steelseg.config import TrainConfig
from steelseg.data import rle
from steelseg.model import inputs
from steelseg.training import epoch, recipe


class Constant(nn.Module):
    """Logits of one value per class everywhere; only sides divisible by 32 are accepted."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"not divisible by 32: {tuple(x.shape)}")
        return self.logits.expand(x.shape[0], -1, *x.shape[-2:]) + 0 * x[:, :1]


def uint8_batch(n, height, width, seed=0, bits=None):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (n, height, width, 3), dtype=np.uint8)
    mask = np.zeros((n, height, width), np.uint8) if bits is None else bits
    return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask)}


def test_forward_padded_crops_back_to_the_image_and_matches_the_padded_model():
    torch.manual_seed(0)
    model = recipe.build_model(TrainConfig()).eval()
    x = torch.randn(2, 3, 40, 170)
    with torch.no_grad():
        out = inputs.forward_padded(model, x)
        padded = model(torch.nn.functional.pad(x, (0, 22, 0, 24), mode="replicate"))
    assert out.shape == (2, 4, 40, 170)
    torch.testing.assert_close(out, padded[..., :40, :170])


def test_evaluate_scores_only_the_unpadded_pixels_of_odd_sized_images():
    height, width = 40, 170
    truth = np.zeros((2, height, width), np.uint8)
    truth[0, :, :] = 0b0100  # class 3 everywhere on the first image
    model = Constant([-9.0, -9.0, 9.0, -9.0])  # predicts class 3 everywhere
    batch = uint8_batch(2, height, width, bits=truth)
    loss_fn = recipe.build_loss(TrainConfig())
    _, seen, counts, samples = epoch.validate_one_epoch(
        model, [batch], loss_fn, torch.device("cpu"), keep=1
    )
    assert seen == 2
    scores = counts.compute()
    # image 1 class 3 is perfect, image 2 class 3 is a false positive, classes 1,2,4 are right
    assert scores.kaggle_dice == pytest.approx(7 / 8)
    assert samples[0][2].shape == (4, height, width)
    assert int(samples[0][2][2].sum()) == height * width


def test_train_one_epoch_on_odd_sized_images_steps_the_optimizer():
    torch.manual_seed(0)
    model = recipe.build_model(TrainConfig())
    config = TrainConfig(warmup_steps=1)
    optimizer = recipe.build_optimizer(config, model)
    scheduler = recipe.build_scheduler(config, optimizer, 10)
    before = model.conv_last.weight.detach().clone()
    total, seen, _ = epoch.train_one_epoch(
        model, [uint8_batch(2, 40, 170)], recipe.build_loss(config), optimizer, scheduler,
        torch.device("cpu"),
    )  # fmt: skip
    assert seen == 2 and np.isfinite(total)
    assert not torch.equal(model.conv_last.weight, before)


def sgd_after(grad_accum):
    """One weight trained with SGD lr=1 on three batches whose loss gradients are 1/4, 2/4, 3/4:
    the loss is the mean of the weight over the class-1 pixels, which cover k/4 of batch k."""

    class Weight(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return self.w * torch.ones(x.shape[0], 4, *x.shape[-2:])

    batches = []
    for k in (1, 2, 3):
        bits = np.zeros((1, 32, 32), np.uint8)
        bits[:, : 8 * k] = 1
        batches.append(uint8_batch(1, 32, 32, bits=bits))
    model = Weight()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def loss_fn(logits, target):
        return (logits[:, 0] * target[:, 0]).mean()

    epoch.train_one_epoch(
        model, batches, loss_fn, optimizer, scheduler, torch.device("cpu"), grad_accum=grad_accum
    )
    return model.w.item()


def test_gradient_accumulation_averages_every_group_and_the_last_partial_one():
    assert sgd_after(grad_accum=1) == pytest.approx(-(0.25 + 0.5 + 0.75))
    # a step of mean(1/4, 2/4), then one of the last batch's 3/4 alone
    assert sgd_after(grad_accum=2) == pytest.approx(-(0.375 + 0.75))
    assert sgd_after(grad_accum=4) == pytest.approx(-0.5)


def test_lr_factor_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    assert recipe.lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert recipe.lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert recipe.lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert recipe.lr_factor(12, 4, 20) == pytest.approx(0.01 + 0.99 * 0.5)
    assert recipe.lr_factor(20, 4, 20) == pytest.approx(0.01)
    assert recipe.lr_factor(50, 4, 20) == pytest.approx(0.01)


def test_schedule_moved_to_a_step_matches_one_stepped_there_and_goes_on_alike():
    from steelseg.config import TrainConfig

    config = TrainConfig(lr=1e-3, warmup_steps=4)

    def schedule():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
        return optimizer, recipe.build_scheduler(config, optimizer, total_steps=40)

    stepped_optimizer, stepped = schedule()
    for _ in range(18):
        stepped_optimizer.step()
        stepped.step()
    moved_optimizer, moved = schedule()
    recipe.move_schedule(moved, 18)
    assert moved_optimizer.param_groups[0]["lr"] == pytest.approx(
        config.lr * recipe.lr_factor(18, 4, 40)
    )
    for _ in range(5):
        assert moved_optimizer.param_groups[0]["lr"] == stepped_optimizer.param_groups[0]["lr"]
        for optimizer, scheduler in ((stepped_optimizer, stepped), (moved_optimizer, moved)):
            optimizer.step()
            scheduler.step()


def test_steps_per_epoch_follow_the_worker_count():
    # 72 training images, batches of 4: 9 a rank on 2 workers, 18 on 1, 5 on 4 (18 images each)
    assert [recipe.batches_per_epoch(72, w, 4) for w in (1, 2, 4)] == [18, 9, 5]
    assert recipe.steps_per_epoch(72, 4, 4, grad_accum=2) == 3


def test_class_bits_decode_and_unpack_every_combination():
    masks = np.zeros((4, 2, 8), np.uint8)
    for value in range(16):
        for c in range(4):
            masks[c, value // 8, value % 8] = (value >> c) & 1
    bits = rle.decode_bits([rle.encode(m) for m in masks], 2, 8)
    assert np.ascontiguousarray(bits).reshape(-1).tolist() == list(range(16))
    unpacked = inputs.unpack_masks(torch.from_numpy(bits)[None])
    assert unpacked.dtype == torch.float32
    np.testing.assert_array_equal(unpacked[0].numpy(), masks)


@pytest.mark.parametrize(
    ("device", "amp", "capability", "expected"),
    [
        ("cpu", False, "AVX512", True),
        ("cpu", True, "AVX512", True),
        ("cpu", False, "AVX2", False),
        ("cuda", True, "AVX2", True),  # bf16 on tensor cores, whatever the host
        ("cuda", False, "AVX512", False),
    ],
)
def test_channels_last_on_a_gpu_with_autocast_and_on_cpus_with_avx512(
    monkeypatch, device, amp, capability, expected
):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert inputs.prefers_channels_last(torch.device(device), amp) is expected


def sgd_step(batch, layout, channels_last):
    """One SGD step of the paper network, seeded, kept in ``layout``: (loss, weights, whether
    the model's input had that layout)."""
    torch.manual_seed(0)
    config = TrainConfig()
    model = recipe.build_model(config).to(memory_format=layout)
    inputs_in_layout = []

    def look(_, args):
        inputs_in_layout.append(args[0].is_contiguous(memory_format=layout))

    model.register_forward_pre_hook(look)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_fn, cpu = recipe.build_loss(config), torch.device("cpu")
    loss, _, _ = epoch.train_one_epoch(
        model, [batch], loss_fn, optimizer, scheduler, cpu, channels_last=channels_last
    )
    return loss, model.state_dict(), inputs_in_layout == [True]


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_a_step_in_either_layout_trains_the_same_and_takes_the_cpus_layout(monkeypatch, capability):
    """The layout is a speed choice only: one SGD step from the same weights gives the same
    loss and weights in both (AdamW's first step is the gradient's sign, which float noise
    flips on gradients near 0); by default the inputs get the CPU's layout."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    bits = np.zeros((2, 32, 64), np.uint8)
    bits[:, 8:20, 10:40] = 0b0101
    batch = uint8_batch(2, 32, 64, bits=bits)
    preferred = torch.channels_last if capability == "AVX512" else torch.contiguous_format
    other = torch.contiguous_format if capability == "AVX512" else torch.channels_last
    default_loss, default_weights, took_it = sgd_step(batch, preferred, channels_last=None)
    assert took_it, "the default did not give the inputs the CPU's layout"
    loss, weights, _ = sgd_step(batch, other, channels_last=other is torch.channels_last)
    assert loss == pytest.approx(default_loss, rel=1e-5)
    for name, value in default_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank, for DDP on the CPU."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(("batches", "grad_accum", "expected"), [(5, 2, 3), (4, 4, 1), (3, 1, 3)])
def test_accumulated_batches_all_reduce_only_before_a_step(
    one_rank_group, batches, grad_accum, expected
):
    """DDP's gradient all-reduce (seen through a comm hook) runs once per optimizer step: for
    the last batch of each group and for the epoch's last batch, not for every micro-batch."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Conv2d(3, 4, 1))
    reduced = []

    def hook(state, bucket):
        reduced.append(bucket.index())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    model.register_comm_hook(None, hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    data = [uint8_batch(1, 32, 32, seed=i) for i in range(batches)]
    epoch.train_one_epoch(
        model, data, recipe.build_loss(TrainConfig()), optimizer, scheduler, torch.device("cpu"),
        grad_accum=grad_accum, channels_last=False,
    )  # fmt: skip
    assert len(reduced) == expected


def test_a_loss_that_stops_being_finite_is_found_at_its_first_batch():
    model = Constant([0.0, 0.0, 0.0, 0.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    calls = []

    def loss_fn(logits, target):  # finite for two batches, then NaN
        calls.append(1)
        value = logits.mean() * 0
        return value + (float("nan") if len(calls) > 2 else 1.0)

    data = [uint8_batch(1, 32, 32, seed=i) for i in range(5)]
    totals = epoch.train_one_epoch(model, data, loss_fn, optimizer, scheduler, torch.device("cpu"))
    assert totals.first_nonfinite_batch == 2 and totals.images == 5
    assert not np.isfinite(totals.loss_sum)
    fine = epoch.train_one_epoch(model, data[:2], nn.MSELoss(), optimizer, scheduler,
                                 torch.device("cpu"))  # fmt: skip
    assert fine.first_nonfinite_batch == -1


def _buffers_of_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    norm = nn.BatchNorm2d(3)
    norm.running_mean.fill_(rank + 1.0)  # each rank's own statistics
    norm.num_batches_tracked.fill_(10 * (rank + 1))
    epoch.broadcast_buffers(norm)
    torch.save({k: v.clone() for k, v in norm.state_dict().items()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_every_rank_validates_with_rank_0s_batchnorm_statistics(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_buffers_of_rank, args=(str(tmp_path / "store"), str(tmp_path / "b")), nprocs=2)
    ranks = [torch.load(tmp_path / f"b.{rank}") for rank in (0, 1)]
    for state in ranks:
        assert (state["running_mean"] == 1.0).all() and state["num_batches_tracked"] == 10


def cpu_with(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    """A CPU whose bf16 instructions torch reports as given."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(
    ("device", "amp", "avx512_bf16", "amx", "expected"),
    [
        ("cpu", True, True, False, torch.bfloat16),
        ("cpu", True, False, True, torch.bfloat16),  # AMX
        ("cpu", True, False, False, None),  # bf16 emulated: slower than float32
        ("cpu", False, True, True, None),  # --no-amp
        ("cuda", True, False, False, torch.bfloat16),  # whatever the host
        ("cuda", False, True, True, None),
    ],
)
def test_bf16_on_a_gpu_and_on_cpus_with_bf16_instructions_when_amp_is_on(
    monkeypatch, device, amp, avx512_bf16, amx, expected
):
    cpu_with(monkeypatch, avx512_bf16, amx)
    assert inputs.autocast_dtype(torch.device(device), amp) is expected


def test_a_torch_without_the_cpu_probes_or_onednn_gets_float32(monkeypatch):
    cpu = torch.device("cpu")
    cpu_with(monkeypatch, True, True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert inputs.autocast_dtype(cpu, amp=True) is None
    monkeypatch.undo()
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert inputs.autocast_dtype(cpu, amp=True) is None


@pytest.mark.parametrize(("bf16_cpu", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_autocast_runs_the_decided_precision(monkeypatch, bf16_cpu, expected):
    cpu_with(monkeypatch, bf16_cpu, False)
    a = torch.ones(4, 4)
    with inputs.autocast(torch.device("cpu"), enabled=True):
        assert (a @ a).dtype == expected
    with inputs.autocast(torch.device("cpu"), enabled=False):
        assert (a @ a).dtype == torch.float32


def sgd_step_in_precision(batch, amp):
    """One SGD step of the paper network, seeded, channels_last as on AVX-512: (loss, the
    step's change of every parameter and statistic, dtypes the first convolution gave)."""
    torch.manual_seed(0)
    config = TrainConfig()
    model = recipe.build_model(config).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    dtypes = []
    model.encoder.conv1.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss, _, _ = epoch.train_one_epoch(
        model, [batch], recipe.build_loss(config), optimizer, scheduler, torch.device("cpu"),
        amp=amp, channels_last=True,
    )  # fmt: skip
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 for k in before)  # weights and BN stats
    return loss, {k: after[k] - v for k, v in before.items()}, dtypes


@pytest.mark.skipif(
    not inputs.cpu_runs_bf16(), reason="this CPU has no avx512_bf16 or AMX: amp stays float32"
)
def test_a_bf16_training_step_on_this_cpu_is_finite_and_close_to_float32():
    """Measured on a 2-core Xeon with avx512_bf16 and AMX (torch 2.14): loss 2e-4 apart, the
    update's cosine with float32's 0.9988 over all parameters (0.967 for the least alike
    tensor), the change of BatchNorm's running statistics 2.7% apart at most."""
    bits = np.zeros((2, 32, 64), np.uint8)
    bits[:, 8:20, 10:40] = 0b0101
    batch = uint8_batch(2, 32, 64, bits=bits)
    loss32, change32, dtypes32 = sgd_step_in_precision(batch, amp=False)
    loss16, change16, dtypes16 = sgd_step_in_precision(batch, amp=True)
    assert dtypes32 == [torch.float32] and dtypes16 == [torch.bfloat16]
    assert np.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=5e-3)
    weights = [k for k in change32 if "running" not in k]
    flat32 = torch.cat([change32[k].flatten() for k in weights])
    flat16 = torch.cat([change16[k].flatten() for k in weights])
    assert torch.isfinite(flat16).all()
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.99
    for k in change32:
        if "running" in k:  # the statistics themselves, not their change
            scale = change32[k].abs().max()
            assert (change16[k] - change32[k]).abs().max() <= 0.05 * scale, k
