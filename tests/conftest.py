import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    from sdinfer.cli import _quiet_libraries

    _quiet_libraries()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from tiny_pipelines import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory):
    from tiny_pipelines import save_tiny_pixart

    return save_tiny_pixart(tmp_path_factory.mktemp("tiny") / "pixart")


@pytest.fixture(scope="session")
def default_pipe():
    from sdinfer.pipeline import Pipeline

    return Pipeline.from_pretrained("default")
