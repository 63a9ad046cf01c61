import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import cofitune_peft  # noqa: F401  (registers the method)

torch.set_num_threads(int(os.environ.get("COFITUNE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
