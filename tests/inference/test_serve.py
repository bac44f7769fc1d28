"""steelseg serve: the request checks without Ray, then one service on the test cluster (started
as a user starts it, `steelseg serve` attached to the running cluster) that the tests below
send good and bad requests, its answers checked against predict's submission, and that the
last test stops, leaving no process behind."""

import asyncio
import dataclasses
import io
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from steelseg import runs
from steelseg.config import TrainConfig
from steelseg.data import rle, synth
from steelseg.errors import SteelsegError
from steelseg.inference import http_api
from steelseg.inference.http_api import Accepted, Refused
from steelseg.inference.postprocess import ClassRule, Rules
from steelseg.training.recipe import build_model

pytest.importorskip("ray.serve")
pytest.importorskip("python_multipart")

H, W = 64, 320


def jpeg(image: np.ndarray, kind: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, kind, quality=95)
    return out.getvalue()


def grey(height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


# --- requests, without Ray -----------------------------------------------------------------


def refusal(call, *args) -> tuple[int, str]:
    with pytest.raises(Refused) as info:
        call(*args)
    assert "\n" not in info.value.reason
    return info.value.status, info.value.reason


def test_a_jpeg_is_decoded_as_predict_decodes_it_and_bad_ones_are_refused(tmp_path):
    from steelseg.data.images import read_image

    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(grey()))
    accepted = Accepted(("visible",), (H, W))
    [(name, image)] = http_api.single_image(path.read_bytes(), accepted)
    assert name == "image"
    np.testing.assert_array_equal(image, read_image(str(path)))

    data = path.read_bytes()
    assert refusal(http_api.single_image, b"hello", accepted) == (400, "image: not a JPEG image")
    status, reason = refusal(http_api.single_image, data[: len(data) // 2], accepted)
    assert status == 400 and reason.startswith("image: unreadable image (image file is truncated")
    assert refusal(http_api.single_image, jpeg(grey(), "PNG"), accepted)[0] == 400
    assert refusal(http_api.single_image, jpeg(grey(H, W + 32)), accepted) == (
        422, "image: 64x352 pixels; the service takes 64x320 pixels (height x width) only"
    )  # fmt: skip
    anything = Accepted(("visible",), None)
    assert http_api.single_image(jpeg(grey(50, 70)), anything)[0][1].shape == (50, 70, 3)
    assert refusal(http_api.single_image, jpeg(grey(8, 4100)), anything)[0] == 422
    fused = Accepted(("visible", "ir"), (H, W))
    assert (
        "send multipart/form-data with parts image, image_ir"
        in refusal(http_api.single_image, data, fused)[1]
    )


def test_a_multipart_batch_pairs_each_image_with_its_modalities():
    fused = Accepted(("visible", "ir"), (H, W))
    a, b = grey(seed=1), grey(seed=2)
    ir = grey(seed=3)[:, :, 0]
    parts = [("image", "a.jpg", jpeg(a)), ("image_ir", "b.jpg", jpeg(ir)),
             ("image", "b.jpg", jpeg(b)), ("image_ir", "a.jpg", jpeg(ir))]  # fmt: skip
    found = http_api.batch_images(parts, fused)
    assert [name for name, _ in found] == ["a.jpg", "b.jpg"]
    assert found[0][1].shape == (H, W, 4)
    assert np.abs(found[0][1][:, :, 3].astype(int) - ir).mean() < 3  # JPEG's loss
    missing = http_api.batch_images, parts[:3], fused
    assert refusal(*missing) == (400, "a.jpg: no image_ir part (this model fuses ir)")
    other = http_api.batch_images, [("file", "a.jpg", jpeg(a))], fused
    assert refusal(*other) == (400, "part 'file': this model takes parts image, image_ir")
    twice = http_api.batch_images, [parts[0], parts[0]], fused
    assert refusal(*twice) == (400, "two parts 'image' named 'a.jpg'")
    smaller = ("image_ir", "a.jpg", jpeg(ir[:32]))
    assert refusal(http_api.batch_images, [parts[0], smaller], fused)[0] == 422


def test_bodies_over_the_limit_and_broken_multipart_are_refused():
    assert refusal(http_api.check_length, "2000", 1000) == (
        413, "request body of 2000 bytes; the limit is 1000"
    )  # fmt: skip
    http_api.check_length("1000", 1000)
    http_api.check_length(None, 1000)

    async def chunks(n: int):
        for _ in range(n):
            yield b"x" * 400

    assert len(asyncio.run(http_api.read_body(chunks(2), 1000))) == 800
    with pytest.raises(Refused, match="request body over 1000 bytes"):
        asyncio.run(http_api.read_body(chunks(3), 1000))

    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    body = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\nDATA\r\n--xyz--\r\n")  # fmt: skip
    assert asyncio.run(http_api.multipart_parts(headers, body)) == [("image", "a.jpg", b"DATA")]
    field = body.replace(b'; filename="a.jpg"', b"")
    with pytest.raises(Refused, match="part 'image' is not a file"):
        asyncio.run(http_api.multipart_parts(headers, field))
    with pytest.raises(Refused, match="bad multipart/form-data body"):
        asyncio.run(http_api.multipart_parts({"content-type": "multipart/form-data"}, body))


def test_an_answer_has_each_class_rle_pixels_and_presence():
    bits = np.zeros((4, 6), np.uint8)
    bits[1, 2:4] = 0b0101  # classes 1 and 3
    answer = http_api.classes_json(bits, np.array([0.9, 0.1, 0.8, 0.2]))
    assert answer == [
        {"class_id": 1, "rle": rle.encode(bits & 1), "pixels": 2, "presence": 0.9},
        {"class_id": 2, "rle": "", "pixels": 0, "presence": 0.1},
        {"class_id": 3, "rle": rle.encode(bits >> 2 & 1), "pixels": 2, "presence": 0.8},
        {"class_id": 4, "rle": "", "pixels": 0, "presence": 0.2},
    ]


def test_serve_settings_are_checked_and_a_config_files_args_too():
    from steelseg.inference.serve import ServeSettings

    assert ServeSettings("r", replicas="1..4").replica_range() == (1, 4)
    assert ServeSettings("r", replicas=2).replica_range() == (2, 2)  # a YAML number
    assert ServeSettings("r", image_size="any").accepted_size() is None
    bad = {
        "image_size": "256 by 1600",
        "replicas": "3..1",
        "max_batch_size": 0,
        "batch_wait_s": -1,
        "gpus_per_replica": "half",
        "threshold": 1.0,
        "tta": "yes",
    }
    for name, value in bad.items():
        with pytest.raises(SteelsegError, match=f"serve {name} "):
            ServeSettings("r", **{name: value})
    with pytest.raises(SteelsegError, match="unknown key"):
        ServeSettings.from_dict({"checkpoint": "r", "max_batch": 4})
    with pytest.raises(SteelsegError, match="checkpoint is required"):
        ServeSettings.from_dict({})


# --- the service -----------------------------------------------------------------------------


def make_run(folder: Path, images: list[np.ndarray]) -> Path:
    """A run of the paper network, untrained, with rules (stored as calibrate stores them) under
    which it marks about a tenth of these images' pixels, with components, areas and a gate at
    work."""
    from steelseg.inference.predict import prepare, probabilities

    config = TrainConfig(head_prior=0.3)
    torch.manual_seed(0)
    model = build_model(config)
    checkpoint = folder / "epoch_0001"
    runs.write_state(checkpoint, {"model": model.state_dict(), "config": config.to_dict(),
                                  "epoch": 1, "metrics": {}})  # fmt: skip
    cpu = torch.device("cpu")
    probs = probabilities(prepare(model.eval(), cpu, False), np.stack(images), cpu, amp=False)
    q90 = [float(np.quantile(probs[:, c], 0.9)) for c in range(4)]
    peaks = np.sort(probs[:, 3].reshape(len(images), -1).max(axis=1))
    rules = (ClassRule(q90[0]), ClassRule(q90[1], min_component=12),
             ClassRule(q90[2], min_area=800),
             ClassRule(q90[3], gate=float(peaks[len(peaks) // 2])))  # fmt: skip
    runs.save_rules(checkpoint, Rules(rules, (H, W)))
    return folder


@dataclasses.dataclass
class Service:
    url: str
    process: subprocess.Popen
    log: Path
    images: dict[str, bytes]  # name -> the JPEG's bytes
    run: Path
    folder: Path  # the images as files, for predict


def healthy(url: str) -> dict | None:
    import requests

    try:
        answer = requests.get(f"{url}/healthz", timeout=5)
    except requests.RequestException:  # not listening yet, or busy starting
        return None
    return answer.json() if answer.status_code == 200 else None


@pytest.fixture(scope="module")
def service(cluster, tmp_path_factory):
    """`steelseg serve` as a process of its own, attached to the test cluster (it finds the
    cluster that ray start recorded, as predict does), on a free port; 6 synthetic images of
    64x320 to send it."""
    from raynodes import end_trees, free_port

    root = tmp_path_factory.mktemp("serve")
    data = synth.write_dataset(root / "data", 6, height=H, width=W, seed=11, processes=1)
    folder = data / "train_images"
    files = sorted(folder.iterdir())
    decoded = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    run = make_run(root / "run", decoded)
    port = free_port()
    log = root / "serve.log"
    argv = [sys.executable, "-m", "steelseg", "serve", str(run), "--port", str(port),
            "--image-size", f"{H}x{W}", "--max-batch-size", "4", "--batch-wait-s", "0.2",
            "--max-body-mb", "1"]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(argv, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=Path(__file__).parents[2])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while healthy(url) is None:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield Service(url, process, log, {p.name: p.read_bytes() for p in files}, run, folder)
    finally:
        if process.poll() is None:  # the last test did not stop it
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                end_trees([process.pid])
                process.wait()


@pytest.fixture(scope="module")
def predicted(service) -> dict[str, list[str]]:
    """predict's RLE strings of each image (Ray Data on the test cluster, as the service runs
    there: one CPU an actor, the checkpoint's amp)."""
    from steelseg.inference.predict import predict

    submission = predict(service.run, service.folder, progress=False, batch_size=4)
    table = submission.sort_values(["ImageId", "ClassId"]).groupby("ImageId")["EncodedPixels"]
    return table.apply(list).to_dict()


def post_jpeg(url: str, data: bytes, content_type: str = "image/jpeg"):
    import requests

    return requests.post(f"{url}/predict", data=data, headers={"Content-Type": content_type},
                         timeout=120)  # fmt: skip


def chunks(data: bytes, size: int):
    """A body of ``size`` bytes of ``data`` over and over, sent without a Content-Length."""
    for _ in range(size // len(data) + 1):
        yield data


def rles(answer: dict) -> list[str]:
    return [c["rle"] for c in answer["classes"]]


def test_the_service_answers_as_predict_does_one_image_or_a_batch(service, predicted):
    import requests

    health = healthy(service.url)
    assert health["status"] == "ok" and health["rules"] == "calibrated rules of epoch_0001"
    assert health["image_size"] == f"{H}x{W}" and health["max_batch_size"] == 4
    found_any = False
    for name, data in service.images.items():
        answer = post_jpeg(service.url, data)
        assert answer.status_code == 200, answer.text
        (image,) = answer.json()["images"]
        assert (image["name"], image["height"], image["width"]) == ("image", H, W)
        assert rles(image) == predicted[name], name
        for c in image["classes"]:
            assert c["pixels"] == (rle.decode(c["rle"], H, W).sum() if c["rle"] else 0)
            assert 0 < c["presence"] < 1
        found_any |= any(rles(image))
    assert found_any, "the rules find nothing: the comparison would be empty"

    files = [("image", (name, data, "image/jpeg")) for name, data in service.images.items()]
    answer = requests.post(f"{service.url}/predict", files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    batch = answer.json()["images"]
    assert [image["name"] for image in batch] == list(service.images)
    assert {image["name"]: rles(image) for image in batch} == predicted


def test_concurrent_requests_are_batched_on_the_replica(service, predicted):
    before = healthy(service.url)["predicted"]
    names = list(service.images) * 2
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda n: post_jpeg(service.url, service.images[n]), names))
    for name, answer in zip(names, answers):
        assert answer.status_code == 200 and rles(answer.json()["images"][0]) == predicted[name]
    after = healthy(service.url)["predicted"]
    assert after["images"] - before["images"] == len(names)
    assert after["batches"] - before["batches"] < len(names)  # some shared a batch


def test_bad_requests_get_a_4xx_with_a_reason_and_the_next_good_one_is_answered(service, predicted):
    import requests

    name, data = next(iter(service.images.items()))
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    bad = {
        "not an image": (lambda: post_jpeg(service.url, b"GIF89a hello"), 400, "not a JPEG"),
        "truncated": (lambda: post_jpeg(service.url, data[: len(data) // 3]), 400, "truncated"),
        "wrong size": (lambda: post_jpeg(service.url, jpeg(image[:, :256])), 422, "64x256"),
        "over the limit": (lambda: post_jpeg(service.url, data * (1_100_000 // len(data))), 413,
                           "the limit is 1000000"),
        "over the limit, chunked": (lambda: post_jpeg(service.url, chunks(data, 1_100_000)),
                                    413, "request body over 1000000 bytes"),
        "wrong type": (lambda: post_jpeg(service.url, data, "text/plain"), 415, "text/plain"),
        "no type": (lambda: requests.post(f"{service.url}/predict", data=data, timeout=60), 415,
                    "content type none"),
        "a field": (lambda: requests.post(f"{service.url}/predict", timeout=60,
                                          files={"image": (None, "text")}), 400, "not a file"),
        "wrong part": (lambda: requests.post(f"{service.url}/predict", timeout=60,
                                             files={"file": ("a.jpg", data)}), 400, "'file'"),
        "GET": (lambda: requests.get(f"{service.url}/predict", timeout=60), 405, "use POST"),
        "elsewhere": (lambda: requests.get(f"{service.url}/model", timeout=60), 404, "no /model"),
    }  # fmt: skip
    for case, (send, status, words) in bad.items():
        answer = send()
        assert answer.status_code == status, (case, answer.text)
        reason = answer.json()["error"]
        assert words in reason and "\n" not in reason, (case, reason)
        good = post_jpeg(service.url, data)
        assert good.status_code == 200 and rles(good.json()["images"][0]) == predicted[name], case


def serve_processes(cluster) -> list[int]:
    """The Ray workers of the test cluster that are Serve's: its controller, proxy and
    replicas (by their process titles)."""
    from raynodes import alive, descendants

    found = []
    for node in cluster.nodes:
        for pid in descendants(node.process.pid):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith((b"ray::Serve", b"ray::ProxyActor")) and alive(pid):
                found.append(pid)
    return found


def test_sigterm_stops_the_service_and_leaves_no_process_behind(service, cluster):
    import requests
    from raynodes import alive, descendants

    serving = serve_processes(cluster)
    assert len(serving) >= 3, serving  # controller, proxy, replica
    tree = descendants(service.process.pid)
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=90) == 0, service.log.read_text()[-3000:]
    log = service.log.read_text()
    assert "serving " in log and "stopped" in log.splitlines()[-1]
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in tree + serving) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in tree + serving if alive(pid)]
    assert serve_processes(cluster) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{service.url}/healthz", timeout=5)
