"""What several test files share: scikit-image photos (as tensors and as folders of PNGs), a tiny
VQIR, fixed batches, a few training steps with their logs, parameter snapshots and the CSVs that
training and testing write; the tiny stage-0 command line; error lines of the entry points;
checkpoints that would run code when unpickled; broken image files; scripts loaded as modules.

Every test folder imports it as ``helpers`` (pytest.ini puts tests/ on the import path)."""
import csv
import importlib.util
import io
import logging
import os
import struct
import sys
import zlib
from contextlib import contextmanager

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from basicsr.data import build_dataset
from basicsr.utils.registry import ARCH_REGISTRY
from PIL import Image
from skimage import data as skdata
from torch.utils.data import default_collate

from vqir.utils.options import parse_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# test fixture files (golden outputs, reference layouts): see tests/fixtures/README.md
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
TRAIN_PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')
# (name, (height, width)): sides that are not all multiples of 16 (padding), LR sides >= 11 (SSIM window)
VAL_PHOTOS = (('astronaut', (184, 200)), ('coffee', (176, 216)))
# a VQIR with every part of the released one, small enough for tests
TINY_VQIR = dict(in_channels=3, out_channels=3, ch=64, ch_mult=[1, 1, 1, 1, 1], double_z=False, num_res_blocks=1,
                 z_channels=64, n_embed=64, embed_dim=64)


@contextmanager
def basicsr_log_records():
    """The records basicsr's logger (which does not propagate to the root) receives inside the block."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger('basicsr')
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def tiny_vqir(stage=2, ir_scale=16, seed=0):
    """The tiny VQIR with random weights (seeded), in eval mode."""
    torch.manual_seed(seed)
    extra = {'attn_mult': [1, 1]} if stage == 2 else {}
    return ARCH_REGISTRY.get('VQIR')(stage=stage, ir_scale=ir_scale, **TINY_VQIR, **extra).eval()


def photo(height, width):
    """A natural RGB image (the astronaut photo, area-resized) as (1, 3, H, W) in [0, 1]."""
    img = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1)[None].float() / 255.
    return F.interpolate(img, size=(height, width), mode='area')


def on_8bit_grid(img):
    return torch.equal(img * 255., torch.round(img * 255.))


def write_photos(folder, photos):
    """Resized scikit-image photos as PNGs: ``photos`` is [(name, (height, width))]."""
    os.makedirs(folder, exist_ok=True)
    for name, (height, width) in photos:
        rgb = cv2.resize(getattr(skdata, name)(), (width, height), interpolation=cv2.INTER_AREA)
        cv2.imwrite(os.path.join(folder, f'{name}.png'), rgb[..., ::-1])
    return folder


def photo_folders(base):
    """(train, val) folders under ``base``: the training photos at 96x96, the validation photos."""
    train = write_photos(os.path.join(base, 'train'), [(name, (96, 96)) for name in TRAIN_PHOTOS])
    return train, write_photos(os.path.join(base, 'val'), VAL_PHOTOS)


def fixed_batch(opt, size=2):
    """The first ``size`` samples of the options' training set, collated."""
    dataset = build_dataset(opt['datasets']['train'])
    return default_collate([dataset[i] for i in range(size)])


def train_steps(model, batch, iterations, first=1):
    """Run ``optimize_parameters`` on one batch for ``iterations`` iterations numbered from ``first``;
    the logs of each step."""
    logs = []
    for it in range(first, first + iterations):
        model.feed_data(batch)
        model.optimize_parameters(it)
        logs.append(dict(model.log_dict))
    return logs


def snapshot(net, parts=None):
    """Copies of the parameters (of the top-level ``parts`` only, if given)."""
    return {k: v.detach().clone() for k, v in net.named_parameters() if parts is None or k.split('.')[0] in parts}


def changed(before, net):
    """Names of the parameters of ``net`` that differ from the ``snapshot`` ``before``."""
    now = dict(net.named_parameters())
    return [k for k, v in before.items() if not torch.equal(v, now[k])]


def read_csv(path):
    with open(path, newline='', encoding='utf-8') as f:
        return list(csv.DictReader(f))


def write_random_metric_weights(torch_home, seed=0):
    """Random-valued weight files of the field's metric networks, in the official formats and under
    the official names, in ``torch_home``/hub/checkpoints: torchvision's VGG16 (LPIPS 'vgg', DISTS),
    DISTS' alpha / beta (summing to 1, as the published ones do) and torch-fidelity's Inception-V3
    (He-initialised convolutions, so that different images give different features)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as inception
    from torchvision import models as tv_models

    folder = os.path.join(torch_home, 'hub', 'checkpoints')
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(tv_models.vgg16(weights=None).state_dict(), os.path.join(folder, 'vgg16-397923af.pth'))
    weights = torch.rand(2, 1, 1475, 1, 1)
    weights /= weights.sum()
    torch.save({'alpha': weights[0], 'beta': weights[1]}, os.path.join(folder, 'dists_weights.pt'))
    # torch-fidelity's constructor always loads weights: build it without, to get its layout
    with mock.patch.object(inception, 'load_state_dict_from_url', lambda *args, **kwargs: {}), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, state: None):
        net = inception.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    torch.save(net.state_dict(), os.path.join(folder, os.path.basename(inception.URL_INCEPTION_V3)))
    return folder


# ---------------------------------------------------------------------------------------------- scripts


def load_script(path):
    """Import scripts/<path>.py (e.g. 'data_preparation/create_lmdb') as a module (registered, so that worker
    processes can unpickle its functions)."""
    module_name = f'vqir_script_{os.path.basename(path)}'
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, 'scripts', f'{path}.py'))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


# ---------------------------------------------------------------------------------------------- entry points

STAGE0_TRAIN_YML = os.path.join(ROOT, 'options', 'train', 'stage0_vqgan_tiny.yml')
STAGE0_NAME = 'stage0_vqgan_tiny'


def stage0_train_argv(data_dirs, *force, yml=STAGE0_TRAIN_YML, extra=()):
    """The tiny stage-0 config with absolute data folders (``data_dirs``: the conftest fixture) and small
    overrides."""
    train_dir, val_dir = data_dirs
    return ['-opt', yml, *extra, '--force_yml', f'datasets:train:dataroot_gt={train_dir}',
            f'datasets:val:dataroot_gt={val_dir}', 'logger:pbar=false', *force]


def parse_train_options(yml, root, photo_dirs, *overrides):
    """``parse_options`` of the training file ``yml`` under ``root``, with the data folders of
    ``photo_dirs`` (the conftest fixture) and ``--force_yml`` overrides."""
    train, val = photo_dirs
    opt, _ = parse_options(str(root), is_train=True, argv=[
        '-opt', yml, '--force_yml', f'datasets:train:dataroot_gt={train}', f'datasets:val:dataroot_gt={val}',
        *overrides])
    return opt


def forbid_downloads(monkeypatch, torch_home):
    """An empty torch cache at ``torch_home``, and any download torch.hub attempts fails the test."""
    monkeypatch.setenv('TORCH_HOME', str(torch_home))

    def no_download(*args, **kwargs):
        raise AssertionError('a download was attempted')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_download)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', no_download)


def cli_env():
    """The environment of an entry point run as a child process: one thread, this checkout importable."""
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith('error: ')]


# ---------------------------------------------------------------------------------------------- hostile checkpoints


def create_marker(path):
    """What a malicious checkpoint runs when it is unpickled: it leaves a file behind."""
    with open(path, 'w', encoding='utf-8') as f:
        f.write('code ran')


class RunsFunction:
    """Unpickling calls create_marker (an importable function, as an attacker's module would be)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return create_marker, (self.marker, )


class RunsShell:
    """Unpickling runs a shell command (os.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


class RunsExec:
    """Unpickling runs Python source (builtins.exec)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("code ran")', )


# ---------------------------------------------------------------------------------------------- broken image files


def _png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def png_bomb(width, height):
    """A valid-looking PNG of a few dozen bytes whose header claims width x height RGB pixels."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr) + _png_chunk(b'IDAT', zlib.compress(b'\x00' * 64)) +
            _png_chunk(b'IEND', b''))


def _photo(height=40, width=48):
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    return base  # smooth BGR uint8


PHOTO = _photo()
GOOD_PNG = cv2.imencode('.png', PHOTO)[1].tobytes()


def gray_alpha_png():
    gray_alpha = np.dstack([PHOTO[:, :, 1], np.linspace(0, 255, PHOTO.shape[1], dtype=np.uint8)[None].repeat(40, 0)])
    out = io.BytesIO()
    Image.fromarray(gray_alpha, 'LA').save(out, 'PNG')
    return out.getvalue()


def _corrupt_idat_png():
    """Complete chunk structure (ends with IEND) but the compressed pixel data is garbage."""
    return GOOD_PNG[:60] + bytes(len(GOOD_PNG) - 72) + GOOD_PNG[-12:]


BROKEN_IMAGES = {  # name: content
    'truncated.png': GOOD_PNG[:len(GOOD_PNG) // 2],
    'empty.png': b'',
    'text.png': b'this is a text file, not an image\n',
    'bomb.png': png_bomb(100000, 100000),
    'corrupt.png': _corrupt_idat_png(),
}

# (file, message after "<path>: "): the same from vqir.rescale and from the datasets (one reader)
BROKEN_CASES = [
    ('truncated.png', 'truncated PNG file (it has no IEND chunk)'),
    ('empty.png', 'empty file'),
    ('text.png', 'not an image, or a format that cannot be decoded'),
    ('bomb.png', 'image is 100000x100000 = 10,000,000,000 pixels, more than the limit of 400,000,000 (possible '
     'decompression bomb'),
    ('corrupt.png', 'PNG data cannot be decoded (truncated or corrupt file)'),
]


def run_train_main(argv, capsys):
    """vqir/train.py's main in this process -> (exit status, stderr)."""
    import pytest

    from vqir.train_pipeline import main as train_main
    with pytest.raises(SystemExit) as stop:
        train_main(argv)
    return stop.value.code, capsys.readouterr().err
