"""Inference commands: ``predict`` writes a Kaggle submission with Ray Data, ``calibrate``
searches the post-processing rules on a run's validation split, ``export`` writes a model as
ONNX and ``serve`` answers HTTP requests with Ray Serve."""

import argparse

from steelseg.cli.command import Command
from steelseg.errors import SteelsegError

PREDICT_DESCRIPTION = """\
Predict defect masks for a folder of images into a Kaggle submission, with Ray Data.

    steelseg predict --checkpoint ~/steelseg_runs/demo --images DIR --out submission.csv
    ray job submit --working-dir . -- python -m ray_jobs.predict --checkpoint /shared/runs/sweep1 \\
        --images /data/severstal/test_images --out /shared/submission.csv --actors 4 --tta

--checkpoint is a checkpoint folder (or its model.pt), a training run (its best checkpoint) or a
Tune sweep (its best trial's). Post-processing is the checkpoint's calibrated rules (`steelseg
calibrate`) when it has them, else --threshold. Each image is predicted at its full size, whatever
the training crop.
"""


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def image_size(text: str) -> tuple[int, int]:
    from steelseg.data.images import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def rules_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--uncalibrated", action="store_true", help="ignore the calibrated rules; use --threshold"
    )
    p.add_argument("--threshold", type=probability, default=0.5, help="without calibration (0.5)")


def use_gpu_argument(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument(
        "--use-gpu", action=argparse.BooleanOptionalAction, default=None, help=default_help
    )


def predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint, run or sweep folder")
    p.add_argument("--images", required=True, help="folder of .jpg images to predict")
    p.add_argument("--out", default="submission.csv", help="CSV to write (submission.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--batch-size", type=positive, default=8, help="images per batch (default 8)")
    p.add_argument("--actors", type=positive, default=1, help="model replicas (default 1)")
    p.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips")
    use_gpu_argument(p, "one GPU per actor (default: when the cluster has GPUs)")
    rules_arguments(p)
    p.add_argument(
        "--strict", action="store_true", help="an unreadable image is an error (default: reported)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def predict(args: argparse.Namespace) -> int:
    from steelseg.inference.predict import predict, write_submission
    from steelseg.storage import locate

    locate(args.out, "out").check_new_file(args.overwrite)  # before every image is predicted
    submission = predict(
        args.checkpoint,
        args.images,
        batch_size=args.batch_size,
        actors=args.actors,
        tta=args.tta,
        use_gpu=args.use_gpu,
        calibrated=not args.uncalibrated,
        threshold=args.threshold,
        strict=args.strict,
        progress=not args.no_progress,
    )
    out = write_submission(submission, args.out)
    images = submission["ImageId"].nunique()
    found = int((submission["EncodedPixels"] != "").sum())
    print(f"wrote {out}: {images} images, {found} class masks found")
    return 0


def calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder, training run or Tune sweep")
    p.add_argument(
        "--batch-size", type=positive, default=8, help="images per forward pass (default 8)"
    )
    p.add_argument("--tta", action="store_true", help="average over flips, as predict --tta")
    use_gpu_argument(p, "run on CUDA (default: when there is one)")


def calibrate(args: argparse.Namespace) -> int:
    from steelseg import runs
    from steelseg.inference.calibrate import calibrate

    rules, report, folder = calibrate(
        args.checkpoint, batch_size=args.batch_size, tta=args.tta, use_gpu=args.use_gpu
    )
    print(f"calibrated on {report['images']} validation images of {folder.parent.name}")
    print("class  threshold  min_area  min_component  gate   Dice before  after")
    for c, rule in enumerate(rules.classes):
        print(
            f"{c + 1:>5}  {rule.threshold:9.2f}  {rule.min_area:8d}  {rule.min_component:13d}  "
            f"{rule.gate:4.2f}   {report['dice_per_class_before'][c]:.4f}       "
            f"{report['dice_per_class_after'][c]:.4f}"
        )
    print(
        f"Kaggle Dice {report['kaggle_dice_before']:.4f} -> {report['kaggle_dice_after']:.4f} "
        f"(all-empty baseline {report['empty_baseline']:.4f}); "
        f"saved {folder / runs.RULES_FILE}"
    )
    return 0


EXPORT_DESCRIPTION = """\
Write a trained model as one ONNX file: the network with its presence gate and the sigmoid in the
graph (probabilities out), batch, height and width dynamic (height and width multiples of 32: pad
at the bottom and right, repeating the edge pixels), float32. The file's metadata holds the class
ids, the input layout and normalisation, the padding rule and the post-processing rules
(calibrated, as predict uses them, or --threshold). docs/serving.md shows how to use it.

    steelseg export ~/steelseg_runs/demo --out demo.onnx
    steelseg export ~/steelseg_runs/psp/epoch_0010 --out psp.onnx --image-size 256x1600
"""


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder, training run or Tune sweep")
    p.add_argument("--out", required=True, help="the .onnx file to write (a path or a URI)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--image-size",
        type=image_size,
        metavar="HxW",
        help="fix height and width (multiples of 32) instead of leaving them dynamic; "
        "pspnet-* needs it",
    )
    rules_arguments(p)


def export(args: argparse.Namespace) -> int:
    from steelseg.inference.export import export_onnx
    from steelseg.storage import locate

    locate(args.out, "out").check_new_file(args.overwrite)
    place, metadata = export_onnx(
        args.checkpoint,
        args.out,
        image_size=args.image_size,
        calibrated=not args.uncalibrated,
        threshold=args.threshold,
    )
    print(
        f"wrote {place}: arch {metadata['arch']}, modalities {metadata['modalities']}, image "
        f"sizes {metadata['input_size']}, {metadata['rules_source']}"
    )
    return 0


SERVE_DESCRIPTION = """\
Serve a trained model over HTTP with Ray Serve, until Ctrl-C: POST /predict with a JPEG
(Content-Type: image/jpeg) or a multipart/form-data batch (a part "image" per image) answers, per
image and class, the mask's RLE in Kaggle's format, its pixel count and the class's presence
score, after the checkpoint's rules (as predict applies them); GET /healthz. A bad request gets a
4xx and a one-line reason. On the Ray cluster that predict would use, or a local Ray; the HTTP
proxy runs on the head node. docs/serving.md has the API; cluster/serve.yaml and
cluster/kuberay/rayservice.yaml run the same application from a config file.

    steelseg serve ~/steelseg_runs/demo --port 8000
    curl -s -H "Content-Type: image/jpeg" --data-binary @0a1cade03.jpg localhost:8000/predict
    steelseg serve s3://bucket/runs/severstal --host 0.0.0.0 --replicas 1..4 --gpus-per-replica 0.5
"""


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder, training run or Tune sweep")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (8000)")
    p.add_argument(
        "--image-size",
        default="256x1600",
        metavar="HxW|any",
        help="the one image size taken (256x1600), or any: up to 4096 a side, padded as "
        "predict pads",
    )
    p.add_argument(
        "--max-batch-size",
        type=positive,
        default=8,
        metavar="N",
        help="images predicted together on a replica (8; 1: no batching)",
    )
    p.add_argument(
        "--batch-wait-s",
        type=float,
        default=0.01,
        metavar="S",
        help="how long a replica waits for a batch to fill (0.01)",
    )
    p.add_argument(
        "--replicas",
        default="1",
        metavar="N|MIN..MAX",
        help="model replicas, or autoscaling's bounds (1)",
    )
    p.add_argument(
        "--cpus-per-replica", type=float, default=1.0, metavar="N", help="CPUs a replica (1)"
    )
    p.add_argument(
        "--gpus-per-replica",
        type=float,
        default=0.0,
        metavar="N",
        help="GPUs a replica, a fraction to share one (0: on CPUs)",
    )
    p.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips")
    rules_arguments(p)
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=16.0,
        metavar="MB",
        help="the largest request body taken (16)",
    )


def serve(args: argparse.Namespace) -> int:
    try:
        from steelseg.inference.serve import ServeSettings, serve_until_stopped
    except ModuleNotFoundError as e:
        if e.name not in ("starlette", "fastapi", "uvicorn"):
            raise
        message = f"steelseg serve needs Ray Serve: pip install 'steelseg[serve]' ({e})"
        raise SteelsegError(message) from None

    settings = ServeSettings(
        checkpoint=args.checkpoint,
        image_size=args.image_size,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_s,
        replicas=args.replicas,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        tta=args.tta,
        calibrated=not args.uncalibrated,
        threshold=args.threshold,
        max_body_mb=args.max_body_mb,
    )
    serve_until_stopped(settings, args.host, args.port, verbose=args.verbose)
    return 0


PREDICT = Command(
    "predict",
    "predict a folder of images into a Kaggle submission (Ray Data)",
    predict_arguments,
    predict,
    PREDICT_DESCRIPTION,
)
CALIBRATE = Command(
    "calibrate",
    "search per-class post-processing on a run's validation split",
    calibrate_arguments,
    calibrate,
)
EXPORT = Command(
    "export",
    "write a trained model as ONNX, with its rules in the metadata",
    export_arguments,
    export,
    EXPORT_DESCRIPTION,
)
SERVE = Command(
    "serve",
    "serve a trained model over HTTP (Ray Serve)",
    serve_arguments,
    serve,
    SERVE_DESCRIPTION,
)
