import shutil
from pathlib import Path

import pytest

from steelseg import synth

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
