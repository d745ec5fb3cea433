import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)
    yield


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
