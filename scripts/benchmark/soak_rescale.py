#!/usr/bin/env python
"""Soak test of ``vqir-rescale down``: many images of mixed sizes and kinds in one run.

    python scripts/benchmark/soak_rescale.py --count 2000 [--weights W.pth --opt options/train/stage2_msrm_tiny.yml]

Generates ``count`` images (sides 16 to 96 pixels, many not multiples of 16; RGB, grey, RGBA
and 16-bit RGB) and a few broken files (truncated, empty, text, a decompression bomb) in a
temporary folder, runs ``vqir.rescale.main(['down', ...])`` once over the folder in this
process, and reports whether every good image was written (with the right LR size), every
broken one reported, and the resident memory after each file. Without ``--weights`` the network
is a randomly initialised one built from ``--opt`` (default: the tiny stage-2 options); the
network's quality does not matter here, only that every file goes through it.

The first ten images include the largest image of every kind (and a 16-pixel strip of every
kind), so that memory measured after the tenth file already holds every buffer size the run
needs: growth after that is a leak.
"""
import argparse
import os
import struct
import sys
import tempfile
import zlib
from os import path as osp

import cv2
import numpy as np

HERE = osp.dirname(osp.abspath(__file__))
if HERE not in sys.path:  # the benchmarking/ modules beside this file
    sys.path.insert(0, HERE)
from benchmarking import ROOT  # noqa: E402
from benchmarking.memory import resident_bytes  # noqa: E402

DEFAULT_OPT = osp.join(ROOT, 'options', 'train', 'stage2_msrm_tiny.yml')
KINDS = ('rgb', 'gray', 'rgba', 'rgb16')
MIN_SIDE, MAX_SIDE = 16, 96
WARM_UP = 10  # files processed before the reference memory reading


def _png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def broken_files(good_png):
    """{name suffix: bytes} of files that must be reported, not processed."""
    ihdr = struct.pack('>IIBBBBB', 100000, 100000, 8, 2, 0, 0, 0)
    bomb = (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr) + _png_chunk(b'IDAT', zlib.compress(b'\x00' * 64)) +
            _png_chunk(b'IEND', b''))
    return {
        'truncated': good_png[:len(good_png) // 2],
        'empty': b'',
        'text': b'not an image\n',
        'bomb': bomb,
    }


def _pixels(rng, height, width, kind):
    """A smooth random image of the kind, as OpenCV writes it (BGR(A), uint8 or uint16)."""
    channels = {'rgb': 3, 'gray': 1, 'rgba': 4, 'rgb16': 3}[kind]
    coarse = rng.random((max(2, height // 8), max(2, width // 8), channels)).astype(np.float32)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    img = img.reshape(height, width, channels)
    if kind == 'rgb16':
        return np.round(img * 65535).astype(np.uint16)
    img = np.round(img * 255).astype(np.uint8)
    return img[:, :, 0] if kind == 'gray' else img


def make_soak_folder(folder, count=200, seed=0):
    """Write ``count`` good images and the broken files into ``folder``.

    Returns (good, bad): good maps file name -> (height, width, kind); bad is the list of
    broken file names. Names sort in processing order; the first ``WARM_UP`` good images
    include the largest image of every kind.
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    good = {}
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        if index < len(KINDS):
            height = width = MAX_SIDE
        elif index < 2 * len(KINDS):  # a strip one scale unit high, of every kind
            height, width = MIN_SIDE, int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        else:
            height, width = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
        name = f'{index:04d}_{kind}_{width}x{height}.png'
        cv2.imwrite(osp.join(folder, name), _pixels(rng, height, width, kind))
        good[name] = (height, width, kind)
    with open(osp.join(folder, sorted(good)[0]), 'rb') as f:
        good_png = f.read()
    bad = []
    for position, (what, content) in zip(np.linspace(WARM_UP + 5, count - 1, 4).astype(int),
                                         broken_files(good_png).items()):
        name = f'{position:04d}_broken_{what}.png'
        with open(osp.join(folder, name), 'wb') as f:
            f.write(content)
        bad.append(name)
    return good, bad


def random_weights(opt_path, out_path, seed=0):
    """Save a randomly initialised network of ``opt_path``'s ``network_g`` block (basicsr layout)."""
    import torch
    import yaml

    import vqir  # noqa: F401  (first: registers the architectures and makes basicsr importable)
    from basicsr.utils.registry import ARCH_REGISTRY
    from vqir.utils.checkpoint import save_state_dict
    with open(opt_path, encoding='utf-8') as f:
        net_opt = dict(yaml.safe_load(f)['network_g'])
    torch.manual_seed(seed)
    save_state_dict(ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt), out_path, param_key='params')
    return out_path


def run_down(folder, out, weights, opt_path=DEFAULT_OPT):
    """``vqir.rescale.main(['down', folder, ...])`` in this process, with the resident memory read
    after every file. Returns (exit status, [rss in bytes after each file, in processing order])."""
    from vqir import rescale
    rss = []
    downscale_file = rescale.downscale_file

    def measured(*args, **kwargs):
        try:
            return downscale_file(*args, **kwargs)
        finally:
            rss.append(resident_bytes())

    rescale.downscale_file = measured
    try:
        status = rescale.main(['down', folder, '-o', out, '--opt', opt_path, '--weights', weights, '--device', 'cpu'])
    finally:
        rescale.downscale_file = downscale_file
    return status, rss


def check_outputs(out, good, scale=16):
    """Names of good images whose LR is missing or of the wrong size, and files that should not be there."""
    from PIL import Image
    problems = []
    expected = {osp.splitext(name)[0] + '.png': spec for name, spec in good.items()}
    for name, (height, width, kind) in expected.items():
        path = osp.join(out, name)
        if not osp.isfile(path):
            problems.append(f'{name}: no output')
            continue
        with Image.open(path) as lr:
            size, mode, text = lr.size, lr.mode, lr.info.get('vqir:original_size')
        if size != (-(-width // scale), -(-height // scale)) or text != f'{width}x{height}':
            problems.append(f'{name}: LR {size}, recorded size {text}')
        if mode != ('RGBA' if kind == 'rgba' else 'RGB'):
            problems.append(f'{name}: LR mode {mode}')
    problems += [f'{name}: unexpected output' for name in sorted(set(os.listdir(out)) - set(expected))]
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--count', type=int, default=200, help='number of good images')
    parser.add_argument('--weights', help='network weights (default: random weights of --opt)')
    parser.add_argument('--opt', default=DEFAULT_OPT, help='options file with the network_g block')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix='vqir_soak_') as tmp:
        folder, out = osp.join(tmp, 'images'), osp.join(tmp, 'lr')
        good, bad = make_soak_folder(folder, args.count, args.seed)
        weights = args.weights or random_weights(args.opt, osp.join(tmp, 'weights.pth'), args.seed)
        status, rss = run_down(folder, out, weights, args.opt)
        problems = check_outputs(out, good)
    mib = 1 << 20
    print(f'{len(good)} images, {len(bad)} broken files: exit status {status} (expected 1)')
    print(f'outputs: {"all correct" if not problems else "; ".join(problems[:10])}')
    print(f'RSS after file {WARM_UP}: {rss[WARM_UP - 1] / mib:.1f} MiB, after the last ({len(rss)}): '
          f'{rss[-1] / mib:.1f} MiB, peak {max(rss) / mib:.1f} MiB ({(rss[-1] / rss[WARM_UP - 1] - 1) * 100:+.1f}%)')
    return 0 if status == 1 and not problems else 1


if __name__ == '__main__':
    sys.exit(main())
