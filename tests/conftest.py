"""Shared pytest set-up: tests run on CPU, one thread, from any working directory."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import vqir  # noqa: E402,F401  (registers everything)

# Tiny tensors gain nothing from more threads, and OpenMP threads spin badly on a busy machine.
torch.set_num_threads(1)


@pytest.fixture
def repo_root():
    return ROOT
