"""Shared test setup: one CPU thread (fastest for the tiny models), and the official manifests."""
import json
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "manifests"


@pytest.fixture
def official_manifest():
    """Loader of an official key manifest from ../shared/manifests (beside the checkout, as in CI).
    A missing manifest fails the test under CI and skips it elsewhere."""

    def load(name):
        path = MANIFESTS / name
        if not path.is_file():
            message = f"{path} not found: the manifests live in ../shared beside the checkout"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        return json.loads(path.read_text())

    return load
