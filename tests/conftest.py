"""Shared pytest set-up: tests run on CPU with few threads, from any working directory."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import vqir  # noqa: E402,F401  (registers everything)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def repo_root():
    return ROOT
