"""Shared test set-up: small CPU thread count, the plugin imported, deterministic seeds."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import timm  # noqa: E402  (the start-up hook registers our variants on this import)
import timm_convmixer  # noqa: E402,F401  (explicit import registers too; harmless twice)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
