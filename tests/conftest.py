import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from steelseg import rle, synth

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The three real Severstal images, their labels and train.csv."""
    return DATA


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic data set (64x320) shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return synth.write_dataset(out, 60, height=64, width=320, seed=7, processes=2)


@pytest.fixture
def data_copy(synth_dir, tmp_path) -> Path:
    """A private copy of the synthetic data set that a test may break."""
    return Path(shutil.copytree(synth_dir, tmp_path / "data"))


H, W = 32, 160


def pytest_collection_modifyitems(items):
    """Every test that needs the Ray cluster, directly or through a fixture, is marked ``ray``,
    so ``pytest -m "not ray"`` runs the rest."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    two_nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    two_nodes.add_node(num_cpus=2)
    ray.init(address=two_nodes.address, log_to_driver=False)
    yield two_nodes
    ray.shutdown()
    two_nodes.shutdown()


@pytest.fixture(scope="session")
def easy_dir(tmp_path_factory) -> Path:
    """An easy set in the Severstal layout: bright class-3 bars and dark class-4 blocks on
    grey noise, so that a few dozen steps visibly learn."""
    out = tmp_path_factory.mktemp("easy")
    (out / "train_images").mkdir()
    rng = np.random.default_rng(0)
    rows = ["ImageId,ClassId,EncodedPixels"]
    for i in range(64):
        image = rng.normal(100, 8, (H, W)).clip(0, 255)
        name = f"{i:09x}.jpg"
        if i % 4:
            class_id, value = (3, 200) if i % 2 else (4, 20)
            mask = np.zeros((H, W), np.uint8)
            x0, y0 = rng.integers(0, W - 48), rng.integers(0, H - 16)
            mask[y0 : y0 + 16, x0 : x0 + 48] = 1
            image[mask == 1] = value
            rows.append(f"{name},{class_id},{rle.encode(mask)}")
        rgb = np.repeat(image.astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(rgb).save(out / "train_images" / name, quality=95)
    (out / "train.csv").write_text("\n".join(rows) + "\n")
    return out
