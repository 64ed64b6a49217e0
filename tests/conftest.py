"""Shared pytest set-up: tests run on CPU, one thread, from any working directory; the fixtures that
test files in several folders use (the demo photos, small photo folders)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import torch  # noqa: E402
from skimage import data as skdata  # noqa: E402

import vqir  # noqa: E402,F401  (registers everything)

from helpers import photo_folders  # noqa: E402

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
    subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'data_preparation', 'export_demo_data.py'), '--out',
                    str(out)], check=True, capture_output=True, timeout=300)
    return str(out)


@pytest.fixture(scope='module')
def photo_dirs(tmp_path_factory):
    """(train, val) folders of scikit-image photos (``helpers.photo_folders``)."""
    return photo_folders(str(tmp_path_factory.mktemp('photos')))


@pytest.fixture(scope='module')
def val_dir(tmp_path_factory):
    """Two small validation photos whose sides are not multiples of 16."""
    folder = tmp_path_factory.mktemp('val')
    for name, photo, size_wh in (('cat', skdata.chelsea(), (80, 64)), ('coffee', skdata.coffee(), (56, 72))):
        cv2.imwrite(str(folder / f'{name}.png'), cv2.resize(photo, size_wh, interpolation=cv2.INTER_AREA)[..., ::-1])
    return str(folder)


@pytest.fixture(scope='module')
def train_dir(tmp_path_factory):
    """The demo training photos: datasets/demo/train, exported to a temporary folder when absent."""
    demo_train = os.path.join(ROOT, 'datasets', 'demo', 'train')
    if os.path.isdir(demo_train):
        return demo_train
    out = tmp_path_factory.mktemp('demo')
    subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'data_preparation', 'export_demo_data.py'), '--out',
                    str(out)], check=True, capture_output=True, timeout=300)
    return str(out / 'train')


@pytest.fixture(scope='module')
def data_dirs(train_dir, val_dir):
    """(train, val) folders for ``helpers.stage0_train_argv``."""
    return train_dir, val_dir
