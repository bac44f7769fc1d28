"""Prediction over HTTP with Ray Serve: ``POST /predict`` answers each image of a request with,
per class, its mask's RLE in Kaggle's format, the pixel count and the class's presence score,
after the checkpoint's rules; ``GET /healthz`` says what the replica serves. A replica holds a
``Predictor``, the model step of ``steelseg predict``: the images of concurrent requests are
batched on it (``@serve.batch``) and predicted a size at a time, as predict's actors do.

``build_app`` makes the application from ``ServeSettings``: ``steelseg serve`` and a Serve
config file (``cluster/serve.yaml``, ``import_path: steelseg.inference.serve:build_app``) both
go through it. ``serve_until_stopped`` runs it on the cluster found by ``init_ray`` (or a local
Ray) until Ctrl-C or SIGTERM, then takes it down.
"""

import asyncio
import dataclasses
import logging
import numbers
import signal
import threading
import time
import typing

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from steelseg.cluster import init_ray, without_ray_notes
from steelseg.data.images import parse_size
from steelseg.errors import SteelsegError
from steelseg.inference import http_api
from steelseg.inference.http_api import Accepted, Refused
from steelseg.inference.predict import Predictor, choose_rules
from steelseg.runs import load_config, resolve_checkpoint

log = logging.getLogger(__name__)

APP_NAME = "steelseg"
# what Ray's core prints at every serve.shutdown, the controller's calls that were waiting when
# it was ended: Serve's own way of stopping, nothing a user can act on
CONTROLLER_ENDED_NOTE = b"Task ServeController."


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What a service serves and how: the ``steelseg serve`` flags, and the ``args`` of a
    Serve config file.

    checkpoint: a checkpoint, a run (its best checkpoint) or a sweep (its best trial's).
    image_size: ``HEIGHTxWIDTH``, the one size taken, or ``any`` (up to 4096 a side, padded to
        multiples of 32 as predict pads).
    max_batch_size: images predicted together on a replica (1: no batching).
    batch_wait_s: how long a replica waits for a batch to fill after its first image.
    replicas: a number, or ``MIN..MAX`` for autoscaling between them.
    cpus_per_replica, gpus_per_replica: Ray resources of a replica (a GPU fraction shares one).
    tta, calibrated, threshold: as for predict.
    max_body_mb: the largest request body taken, in MB.
    """

    checkpoint: str
    image_size: str = "256x1600"
    max_batch_size: int = 8
    batch_wait_s: float = 0.01
    replicas: str = "1"
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    tta: bool = False
    calibrated: bool = True
    threshold: float = 0.5
    max_body_mb: float = 16.0

    def __post_init__(self):
        object.__setattr__(self, "replicas", str(self.replicas))  # a YAML number
        self.accepted_size()
        self.replica_range()
        for name in ("max_batch_size",):
            if not _is_whole(getattr(self, name)) or getattr(self, name) < 1:
                _bad(name, "must be a whole number >= 1", getattr(self, name))
        checks = {
            "batch_wait_s": (0, 60),
            "cpus_per_replica": (0, 1024),
            "gpus_per_replica": (0, 1024),
            "max_body_mb": (1e-3, 1024),
        }
        for name, (low, high) in checks.items():
            value = getattr(self, name)
            if not (_is_number(value) and low <= value <= high):
                _bad(name, f"must be a number in [{low}, {high}]", value)
        if not (_is_number(self.threshold) and 0 < self.threshold < 1):
            _bad("threshold", "must be in (0, 1)", self.threshold)
        for name in ("tta", "calibrated"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, "must be true or false", getattr(self, name))

    @classmethod
    def from_dict(cls, values: dict) -> "ServeSettings":
        """From a config file's ``args``: unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            known = ", ".join(sorted(fields))
            raise SteelsegError(f"serve args: unknown key(s) {', '.join(unknown)}; known: {known}")
        if "checkpoint" not in values:
            raise SteelsegError("serve args: checkpoint is required")
        return cls(**values)

    def accepted_size(self) -> tuple[int, int] | None:
        if self.image_size == "any":
            return None
        try:
            return parse_size(self.image_size)
        except (ValueError, AttributeError):
            _bad("image_size", "must be HEIGHTxWIDTH (e.g. 256x1600) or any", self.image_size)

    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas; equal for a fixed number."""
        low, sep, high = self.replicas.partition("..")
        if not (low.isdigit() and (high.isdigit() if sep else True)):
            _bad("replicas", "must be a number or MIN..MAX (e.g. 1..4)", self.replicas)
        bounds = (int(low), int(high if sep else low))
        if bounds[1] < 1 or bounds[0] > bounds[1]:
            _bad("replicas", "must be >= 1, or MIN..MAX with 0 <= MIN <= MAX", self.replicas)
        return bounds


def _is_whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def _bad(name: str, rule: str, value) -> typing.NoReturn:
    raise SteelsegError(f"serve {name} {rule}, got {value!r}")


@serve.deployment(name="SteelsegService")
class SteelsegService:
    """One replica: the model, and the HTTP routes."""

    def __init__(self, settings: dict, checkpoint: str, rules: dict, rules_name: str):
        self.settings = ServeSettings(**settings)
        self.predictor = Predictor(checkpoint, self.settings.tta, rules, use_gpu=None)
        config = self.predictor.config
        self.accepted = Accepted(tuple(config.modalities), self.settings.accepted_size())
        self.max_body = round(self.settings.max_body_mb * 1e6)
        # the ignores: @serve.batch adds these setters, which its annotation does not show
        self.predict_batch.set_max_batch_size(self.settings.max_batch_size)  # type: ignore[attr-defined]
        self.predict_batch.set_batch_wait_timeout_s(self.settings.batch_wait_s)  # type: ignore[attr-defined]
        self.health = {
            "status": "ok",
            "checkpoint": checkpoint,
            "arch": config.arch,
            "modalities": list(config.modalities),
            "image_size": self.settings.image_size,
            "rules": rules_name,
            "tta": self.settings.tta,
            "device": str(self.predictor.device),
            "max_batch_size": self.settings.max_batch_size,
        }
        self.predicted = {"images": 0, "batches": 0}  # by this replica

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            return await self.route(request)
        except Refused as e:
            return JSONResponse({"error": e.reason}, status_code=e.status)

    async def route(self, request: Request) -> JSONResponse:
        # the path below the application's route prefix (a config file may set one)
        path = request.url.path.removeprefix(request.scope.get("root_path", "")) or "/"
        method = request.method
        if path == "/healthz":
            if method != "GET":
                raise Refused(405, f"{method} /healthz: use GET")
            return JSONResponse({**self.health, "predicted": dict(self.predicted)})
        if path != "/predict":
            raise Refused(404, f"no {path}: POST /predict or GET /healthz")
        if method != "POST":
            raise Refused(405, f"{method} /predict: use POST")
        kind = http_api.media_type(request.headers.get("content-type", ""))
        if kind not in ("image/jpeg", "multipart/form-data"):
            raise Refused(
                415, f"content type {kind or 'none'}: send image/jpeg or multipart/form-data"
            )
        http_api.check_length(request.headers.get("content-length"), self.max_body)
        body = await http_api.read_body(request.stream(), self.max_body)
        if kind == "image/jpeg":
            found = await asyncio.to_thread(http_api.single_image, body, self.accepted)
        else:
            parts = await http_api.multipart_parts(request.headers, body)
            found = await asyncio.to_thread(http_api.batch_images, parts, self.accepted)
        answers = await asyncio.gather(*(self.predict_batch(image) for _, image in found))
        images = [
            http_api.image_json(name, image, classes)
            for (name, image), classes in zip(found, answers)
        ]
        return JSONResponse({"images": images})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list) -> list[list[dict]]:
        """Images of one or more requests -> each one's classes, off the event loop (which
        meanwhile takes requests, and fills the next batch)."""
        return await asyncio.to_thread(self.predict_classes, images)

    def predict_classes(self, images: list) -> list[list[dict]]:
        bits, scores = self.predictor.predict_bits(images)
        self.predicted["images"] += len(images)
        self.predicted["batches"] += 1
        return [http_api.classes_json(b, s) for b, s in zip(bits, scores)]


def build_app(args: dict) -> serve.Application:
    """The application for ``ServeSettings.from_dict(args)``: the checkpoint found and its
    config and weights checked here (on the driver, or where Serve builds a config file's
    application), its rules chosen as predict chooses them.

    Raises:
        SteelsegError: bad settings, or no checkpoint, or a broken one.
    """
    settings = ServeSettings.from_dict(args)
    folder = resolve_checkpoint(settings.checkpoint)
    load_config(folder, check_weights=True)
    rules, rules_name = choose_rules(folder, settings.calibrated, settings.threshold)
    low, high = settings.replica_range()
    scaling = (
        {"num_replicas": low}
        if low == high
        else {
            "autoscaling_config": {
                "min_replicas": low,
                "initial_replicas": max(low, 1),
                "max_replicas": high,
                "target_ongoing_requests": settings.max_batch_size,
            }
        }
    )
    # the ignore: @serve.deployment makes the class a Deployment, which mypy does not see
    deployment = SteelsegService.options(  # type: ignore[attr-defined]
        **scaling,
        max_ongoing_requests=2 * settings.max_batch_size,  # a batch running, the next filling
        ray_actor_options={
            "num_cpus": settings.cpus_per_replica,
            "num_gpus": settings.gpus_per_replica,
        },
    )
    values = dataclasses.asdict(settings)
    return deployment.bind(values, folder.target, rules.to_dict(), rules_name)


def serve_until_stopped(
    settings: ServeSettings, host: str, port: int, *, verbose: bool = False
) -> None:
    """Run the service on the cluster ``init_ray`` finds (or a local Ray) with one HTTP proxy,
    on the head node, at ``host:port``, until Ctrl-C or SIGTERM; then delete it, shut Serve
    down if nothing else is served, and end a local Ray.

    Raises:
        SteelsegError: bad settings, or no checkpoint, or a broken one (before Ray starts).
    """
    import ray

    app = build_app(dataclasses.asdict(settings))
    most = settings.replica_range()[1]
    attached = init_ray(max(most, 1) * max(1, round(settings.cpus_per_replica)), verbose=verbose)
    logging.getLogger("ray.serve").setLevel(logging.INFO if verbose else logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (Kubernetes, `ray job stop`, a test) stops the service as Ctrl-C does, also
        # in a process started in the background, whose SIGINT is ignored
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        log.info(
            "serving %s at http://%s:%d: POST /predict, GET /healthz (Ctrl-C stops)",
            settings.checkpoint,
            host,
            port,
        )
        while True:  # until KeyboardInterrupt
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping the service")
    finally:
        with without_ray_notes((CONTROLLER_ENDED_NOTE,)):
            stop_service()
            if not attached:
                ray.shutdown()
    log.info("stopped")


def stop_service() -> None:
    """Delete the application, and Serve with it when it serves nothing else."""
    try:
        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as e:  # Ray already down: nothing left to take down
        log.debug("stopping the service: %s", e)
