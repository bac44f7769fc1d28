"""Ray Tune sweeps over the training config, the Ray Train V2 way: each trial is a function that
builds and fits a ``TorchTrainer`` (``steelseg.training.fit.fit``) with a stable run name, and
Train's per-epoch reports reach Tune through ``TuneReportCallback``, so ASHA stops poor trials
early.

A sweep lives in ``<storage>/<name>/``: Tune's state (rerunning with the same name restores an
interrupted sweep), ``trials/<trial>/`` (each trial's Train run: checkpoints, history and
TensorBoard, so ``tensorboard --logdir <storage>/<name>/trials`` compares them all, HParams
included), ``results.csv`` (trials sorted by val Dice), ``best_config.yaml`` (for
``ray_jobs/train.py --config``) and ``best_checkpoint.txt``."""

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from steelseg import runs
from steelseg.cluster import init_ray
from steelseg.config import TrainConfig
from steelseg.data import catalog
from steelseg.errors import SteelsegError
from steelseg.storage import Location, locate
from steelseg.training.fit import (
    check_paths_on_nodes,
    checked_table,
    cpus_needed,
    data_folder,
    failure_reason,
    fit,
    inspect_on_nodes,
)

SAMPLERS = {
    "loguniform": tune.loguniform,
    "uniform": tune.uniform,
    "randint": tune.randint,
    "choice": lambda *values: tune.choice(list(values)),
    "grid": lambda *values: tune.grid_search(list(values)),  # every value, x num_samples
}
FIXED_BY_SWEEP = ("name", "storage", "epochs")
TRIAL_DRIVER_MEMORY = 256 * 2**20

log = logging.getLogger(__name__)


def search_space(spec: dict[str, Any]) -> dict[str, Any]:
    """``{"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [4, 8]}}`` -> Tune's
    space. Any TrainConfig field may be searched.

    Raises:
        SteelsegError: an unknown field or sampler, or a field the sweep itself sets.
    """
    defaults = TrainConfig().to_dict()
    space = {}
    for key, sampler in spec.items():
        if key not in defaults:
            raise SteelsegError(f"search space: unknown config key {key!r}")
        if key in FIXED_BY_SWEEP:
            raise SteelsegError(f"search space: {key!r} is set by the sweep, not searched")
        if not isinstance(sampler, dict) or len(sampler) != 1:
            raise SteelsegError(f"search space: {key} needs one sampler, e.g. {{uniform: [0, 1]}}")
        ((kind, args),) = sampler.items()
        if kind not in SAMPLERS:
            raise SteelsegError(
                f"search space: {key} sampler {kind!r} is not one of {', '.join(SAMPLERS)}"
            )
        if not isinstance(args, list) or not args:
            raise SteelsegError(f"search space: {key} {kind} needs a list of values, got {args!r}")
        if kind in ("loguniform", "uniform", "randint") and len(args) != 2:
            raise SteelsegError(f"search space: {key} {kind} needs [low, high], got {args!r}")
        values = [_typed(key, value, defaults[key]) for value in args]
        space[key] = SAMPLERS[kind](*values)
    return space


def trial_count(spec: dict[str, Any], num_samples: int) -> int:
    """How many trials a sweep of this search-space spec runs: ``num_samples`` times every
    combination of the grids."""
    count = num_samples
    for sampler in spec.values():
        ((kind, args),) = sampler.items()
        if kind == "grid":
            count *= len(args)
    return count


def local_cpus(base: TrainConfig, spec: dict[str, Any], num_samples: int) -> int:
    """The CPUs a local Ray started for a sweep is given: this machine's, and every trial's
    workers' once more. Ray Train (2.60) inside Tune keeps a finished trial's placement group,
    its workers' CPUs, reserved until the driver ends; without room for them a machine with a
    trial's CPUs and no more waits forever at the second trial (its workers leave Ray Data none).
    The kept groups use no CPU, so the machine is not oversubscribed by them."""
    kept = trial_count(spec, num_samples) * base.num_workers * base.cpus_per_worker
    return (os.cpu_count() or 1) + math.ceil(kept)


def _typed(key: str, value: Any, default: Any) -> Any:
    """A value of the field's type (YAML reads 1e-4, without a dot, as a string), checked by
    the config's own validation."""
    if isinstance(default, int | float) and not isinstance(default, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if math.isnan(number) or (isinstance(default, int) and not number.is_integer()):
            kind = type(default).__name__
            raise SteelsegError(f"search space: {key} takes {kind} values, got {value!r}")
        value = int(number) if isinstance(default, int) else number
    try:
        TrainConfig().replace(**{key: value})
    except SteelsegError as e:
        raise SteelsegError(f"search space: {e}") from None
    return value


def run_trial(params: dict[str, Any], base: dict, sweep_dir: str) -> None:
    """One trial: the base config with this trial's values, trained by Ray Train.

    Tune stops the trial (ASHA, or the last epoch) by ending this function's actor, so nothing
    after ``fit`` is sure to run: the sweep's driver writes the trial's summaries.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = Path(tune.get_context().get_trial_dir()).name  # the same name as Tune's trial folder
    sweep_config = TrainConfig.from_dict(base)
    config = sweep_config.replace(
        **params, storage=runs.trials_dir(sweep_dir).target, name=trial, calibrate=False
    )
    checks = trial_checks(sweep_config, sweep_dir)
    result = fit(config, callbacks=[TuneReportCallback()], checks=checks)
    if result.error:
        raise result.error  # Tune marks the trial ERRORED; a restore reruns it


def trial_checks(base: TrainConfig, sweep_dir: str | Location) -> tuple[Location, ...]:
    """Where a trial looks for the data set's check: the sweep's folder, where the sweep's
    driver records a check it made, and the sweep's storage's ``data_checks/``, whose record
    of an earlier run the driver trusted without copying it."""
    shared = runs.data_checks_dir(base.storage_path, data_folder(base).target, base.modalities)
    return locate(sweep_dir, "sweep"), shared


def check_resources(base: TrainConfig, max_concurrent: int) -> None:
    """Warn when the trials' workers would leave Ray Data no CPU: the sweep would wait forever."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    workers = max_concurrent * base.num_workers * base.cpus_per_worker
    if workers + 1 > cpus:
        log.warning(
            "%d trials x %d workers take %g of the cluster's %g CPUs; reading data needs at "
            "least one more (fewer concurrent trials, or an autoscaling cluster)",
            max_concurrent,
            base.num_workers,
            workers,
            cpus,
        )


def sweep(
    base: TrainConfig,
    space: dict[str, Any],
    *,
    num_samples: int,
    max_concurrent: int,
    grace_period: int = 1,
    reduction_factor: int = 2,
) -> "SweepResult":
    """Run (or restore) the sweep ``<storage>/<name>`` and write its result files.

    Raises:
        SteelsegError: a bad search space, or a sweep in which no trial finished an epoch.
    """
    base = base.resolved()
    sweep_dir = base.run_dir
    searched = search_space(space)
    needed = cpus_needed(base.replace(num_workers=base.num_workers * max_concurrent))
    init_ray(max(needed, local_cpus(base, space, num_samples)))  # attached: a cluster's own
    check_resources(base, max_concurrent)
    check_paths_on_nodes(base)
    # the images are decoded in full once here, not once a trial, and not at all when a run in
    # the same storage checked this listing already (its data_checks/)
    data = data_folder(base)
    checked_table(
        base,
        data,
        catalog.inspect_many if data.local else inspect_on_nodes,
        trial_checks(base, sweep_dir),
    )
    # The trial function only drives its TorchTrainer, whose workers reserve their own CPUs.
    # It takes no CPU: a fraction would leave each node with less than the one whole CPU a
    # Ray Data task needs, and concurrent trials would wait forever. (Tune needs some resource.)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), sweep_dir=sweep_dir.target),
        {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    # Tune takes a URI's path and its filesystem apart, as Ray Train does
    filesystem = None if sweep_dir.local else sweep_dir.fs
    if tune.Tuner.can_restore(sweep_dir.path, storage_filesystem=filesystem):
        log.info("restoring the sweep in %s: finished trials are kept, the rest run", sweep_dir)
        tuner = tune.Tuner.restore(
            sweep_dir.path,
            trainable=trainable,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=searched,
            tune_config=tune.TuneConfig(
                metric=runs.SCORE,
                mode="max",
                num_samples=num_samples,
                max_concurrent_trials=max_concurrent,
                scheduler=ASHAScheduler(
                    time_attr="epoch",
                    max_t=base.epochs,
                    grace_period=grace_period,
                    reduction_factor=reduction_factor,
                ),
            ),
            run_config=tune.RunConfig(
                name=base.name,
                storage_path=sweep_dir.parent.path,
                storage_filesystem=filesystem,
            ),
        )
    results = tuner.fit()
    return write_results(results, base, sweep_dir)


@dataclass
class SweepResult:
    """A finished sweep: its folder, the trials sorted by val Dice, and the winner."""

    sweep_dir: Location
    table: pd.DataFrame  # trial, the searched values, epochs_run, val Dice, best epoch, error
    best_trial: str
    best_score: float
    best_config: Location  # a config file for the train command
    best_checkpoint: Location


def best_epoch(history: pd.DataFrame) -> pd.Series | None:
    """A trial's history row with the best val Dice, the later epoch on a tie, as
    ``runs.best_checkpoint`` picks the checkpoint (None for an empty history)."""
    if history.empty:
        return None
    return history.sort_values([runs.SCORE, "epoch"], na_position="first").iloc[-1]


def write_results(results: tune.ResultGrid, base: TrainConfig, sweep_dir: Location) -> SweepResult:
    """results.csv sorted by val Dice, every trial's HParams, the best config and checkpoint."""
    trials = [results[i] for i in range(len(results))]  # a ResultGrid is typed as indexed only
    rows = []
    for result in trials:
        assert result.config is not None  # Tune gives each trial's result its searched values
        trial = Path(result.path).name
        run_dir = runs.trials_dir(sweep_dir) / trial
        history = runs.read_history(run_dir)
        best = best_epoch(history)
        rows.append(
            {
                "trial": trial,
                **result.config,
                "epochs_run": int(history["epoch"].max()) if best is not None else 0,
                runs.SCORE: float(best[runs.SCORE]) if best is not None else math.nan,
                "best_epoch": int(best["epoch"]) if best is not None else 0,
                "run_dir": run_dir.target,
                "error": failure_reason(result.error) if result.error else "",
            }
        )
        if best is not None:
            write_hparams(run_dir, result.config, history)
    table = pd.DataFrame(rows).sort_values(runs.SCORE, ascending=False, na_position="last")
    winner = table.iloc[0]
    if math.isnan(winner[runs.SCORE]):
        (sweep_dir / runs.RESULTS_FILE).write_text(table.to_csv(index=False))
        errors = [e for e in table["error"] if e]
        first = f" (first error: {errors[0]})" if errors else ""
        raise SteelsegError(
            f"{sweep_dir}: no trial finished an epoch{first}; see {runs.trials_dir(sweep_dir)}"
        )
    params = next(r.config for r in trials if Path(r.path).name == winner["trial"])
    assert params is not None
    best_config = base.replace(**params, name=f"{base.name}-best")
    checkpoint = runs.best_checkpoint(winner["run_dir"])
    runs.write_sweep_results(sweep_dir, table, best_config, checkpoint)
    return SweepResult(
        sweep_dir=sweep_dir,
        table=table,
        best_trial=winner["trial"],
        best_score=float(winner[runs.SCORE]),
        best_config=runs.best_config_path(sweep_dir),
        best_checkpoint=checkpoint,
    )


def write_hparams(run_dir: Location, params: dict, history: pd.DataFrame) -> None:
    """The trial's searched values and final scores for TensorBoard's HParams view (rewritten
    on every run of the sweep, so a restored sweep shows each trial once)."""
    from torch.utils.tensorboard import SummaryWriter

    folder = runs.tensorboard_dir(run_dir) / "hparams"
    if folder.exists():
        folder.fs.delete_dir(folder.path)
    final = {
        f"hparams/{runs.SCORE}": float(history[runs.SCORE].max()),
        "hparams/val_loss": float(history["val_loss"].iloc[-1]),
        "hparams/epochs": float(history["epoch"].iloc[-1]),
    }
    with tempfile.TemporaryDirectory(prefix="steelseg-hparams-") as staging:
        with SummaryWriter(staging) as writer:
            writer.add_hparams(params, final, run_name=".")
        folder.upload(staging)


def read_space_file(path: str | os.PathLike) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(Path(path).read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())
        raise SteelsegError(f"{path}: cannot read search space ({reason})") from None
    if not isinstance(spec, dict):
        raise SteelsegError(f"{path}: expected a mapping of config keys to samplers")
    return spec
