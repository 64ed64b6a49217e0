"""Shared pytest set-up: tests run on CPU, one thread, from any working directory."""
import os
import subprocess
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


@pytest.fixture(scope='session')
def demo(tmp_path_factory):
    """The bundled demo photos: datasets/demo when exported, else exported once into a temporary folder."""
    folder = os.path.join(ROOT, 'datasets', 'demo')
    if os.path.isdir(os.path.join(folder, 'train')) and os.path.isdir(os.path.join(folder, 'val')):
        return folder
    out = tmp_path_factory.mktemp('demo')
    subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'export_demo_data.py'), '--out', str(out)],
                   check=True, capture_output=True, timeout=300)
    return str(out)
