"""scripts/benchmark/benchmark_jpeg.py with a tiny network: the PNG row is the reference, each lossy row is
measured from the LR file's own bytes."""
import csv
import importlib.util
import os

import cv2
import pytest
import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY
from skimage import data as skdata

from vqir.utils.checkpoint import save_state_dict

from helpers import ROOT, TINY_VQIR

TINY = dict(type='VQIR', stage=2, ir_scale=16, **TINY_VQIR, attn_mult=[1, 1])


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A tiny 16x checkpoint (basicsr layout) and options file, and a photo (as tests/cli/test_rescale.py's)."""
    root = tmp_path_factory.mktemp('rescale')
    torch.manual_seed(0)
    net16 = ARCH_REGISTRY.get('VQIR')(**{k: v for k, v in TINY.items() if k != 'type'})
    save_state_dict(net16, str(root / 'tiny16.pth'), param_key='params')
    with open(root / 'tiny16.yml', 'w') as f:
        yaml.safe_dump({'name': 'tiny', 'network_g': TINY}, f)
    images = root / 'images'
    images.mkdir()
    photo = cv2.resize(skdata.astronaut(), (76, 100), interpolation=cv2.INTER_AREA)  # (100, 76, 3) RGB
    cv2.imwrite(str(images / 'photo.png'), photo[:, :, ::-1])
    return {'weights16': str(root / 'tiny16.pth'), 'opt16': str(root / 'tiny16.yml'),
            'photo': str(images / 'photo.png')}


def test_jpeg_benchmark_measures_every_codec_against_the_png_path(files, tmp_path, capsys):
    """scripts/benchmark/benchmark_jpeg.py: the PNG row is the reference (no change, every code kept), each
    lossy row is measured from the LR file's own bytes."""
    spec = importlib.util.spec_from_file_location('benchmark_jpeg',
                                                  os.path.join(ROOT, 'scripts', 'benchmark', 'benchmark_jpeg.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(['--opt', files['opt16'], '--weights', files['weights16'], '--images', files['photo'],
                       '-o', str(tmp_path / 'jpeg')]) == 0
    table = capsys.readouterr().out
    assert table == (tmp_path / 'jpeg.md').read_text() and '| JPEG 50 |' in table and '| WebP 90 |' in table
    with open(tmp_path / 'jpeg.csv', encoding='utf-8') as f:
        rows = {r['codec']: r for r in csv.DictReader(f) if r['photo'] == 'mean'}
    assert list(rows) == ['PNG', 'JPEG 95', 'JPEG 90', 'JPEG 75', 'JPEG 50', 'WebP 90']
    assert float(rows['PNG']['y_psnr_change']) == 0 and float(rows['PNG']['codes_kept']) == 1
    assert all(0 <= float(r['codes_kept']) <= 1 for r in rows.values())
    assert float(rows['JPEG 50']['lr_bytes']) < float(rows['JPEG 95']['lr_bytes'])
    assert float(rows['JPEG 95']['lr_psnr']) >= float(rows['JPEG 50']['lr_psnr'])
