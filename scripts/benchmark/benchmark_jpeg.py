#!/usr/bin/env python
"""How much a VQIR reconstruction loses when its LR is shared as a JPEG or WebP.

    python scripts/benchmark/benchmark_jpeg.py --opt options/test/demo_x16.yml            # the demo's network
    python scripts/benchmark/benchmark_jpeg.py --weights pretrained/vqir_x16.pth --images datasets/DIV2K/DIV2K_valid_HR

Each photo is downscaled by the network; its 8-bit LR is then stored as PNG (the lossless path),
as JPEG at quality 95, 90, 75 and 50 (4:2:0, the libjpeg encoder OpenCV and PIL use) and as WebP
90, read back, and upscaled. Per codec, the mean over the photos of: the reconstruction's Y-PSNR
(border 16), RGB-PSNR and mean CIEDE2000 against the photo, its Y-PSNR change against the PNG
path, the LR's PSNR against the PNG LR, the LR file size, and the share of codebook positions whose
code is the one the PNG LR maps to (after the inverse IFRM the features snap to the nearest code,
which can absorb small errors). Writes ``<out>.md`` and ``<out>.csv`` and prints the table.
"""
import argparse
import csv
import io
import sys
from os import path as osp

import numpy as np
import torch

import vqir  # noqa: F401  (must precede basicsr: it installs the torchvision shim basicsr needs)
from basicsr.metrics import calculate_psnr
from vqir.metrics.ciede2000_metric import calculate_ciede2000
from vqir.rescale import UsageError, build_rescaler
from vqir.utils.allocator import use_huge_pages
from vqir.utils.atomic_file import atomic_write_bytes
from vqir.utils.checkpoint import CheckpointError
from vqir.utils.image_io import ImageReadError, decode_image, encode_image, list_images, read_image
from vqir.utils.options import OptionsError

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir, osp.pardir))  # the repository
# (label, file extension, quality): PNG first, the reference every other row is compared with
CODECS = (('PNG', 'png', None), ('JPEG 95', 'jpg', 95), ('JPEG 90', 'jpg', 90), ('JPEG 75', 'jpg', 75),
          ('JPEG 50', 'jpg', 50), ('WebP 90', 'webp', 90))
BORDER = 16


def _uint8_bgr(img01):
    """(1, 3, H, W) RGB tensor or (H, W, 3) RGB array in [0, 1] -> uint8 (H, W, 3) BGR, as saved."""
    if isinstance(img01, torch.Tensor):
        img01 = img01[0].permute(1, 2, 0).cpu().numpy()
    return np.round(np.clip(img01[..., ::-1], 0., 1.) * 255.).astype(np.uint8)


def measure_photo(rescaler, hr01, codecs=CODECS):
    """{codec label: {metric: value}} for one photo, (H, W, 3) RGB float in [0, 1]."""
    hr = torch.from_numpy(np.ascontiguousarray(hr01.transpose(2, 0, 1)))[None]
    lr = rescaler.downscale(hr)
    out_size = rescaler.output_size(*hr.shape[-2:])
    target = _uint8_bgr(hr01[:out_size[0], :out_size[1]])
    png_codes = rescaler.codes(lr)
    png_lr = _uint8_bgr(lr)
    rows = {}
    for label, ext, quality in codecs:
        data = encode_image(f'lr.{ext}', lr[0], quality=quality)
        shared, _ = decode_image(data, f'{label} LR')
        shared = torch.from_numpy(np.ascontiguousarray(shared.transpose(2, 0, 1)))[None]
        outputs = rescaler.upscale(shared, out_size=out_size)
        rec = _uint8_bgr(outputs['Level_1'] if 'Level_1' in outputs else outputs['SR'])
        rows[label] = {
            'y_psnr': calculate_psnr(rec, target, BORDER, test_y_channel=True),
            'rgb_psnr': calculate_psnr(rec, target, BORDER, test_y_channel=False),
            'ciede2000': calculate_ciede2000(rec, target, BORDER),
            'lr_psnr': calculate_psnr(_uint8_bgr(shared), png_lr, 0, test_y_channel=False),
            'lr_bytes': len(data),
            'codes_kept': float((rescaler.codes(shared) == png_codes).float().mean()),
        }
    for label in rows:
        rows[label]['y_psnr_change'] = rows[label]['y_psnr'] - rows['PNG']['y_psnr']
    return rows


def summarise(per_photo):
    """Mean over photos per codec: [(label, {metric: mean})] in CODECS order."""
    labels = list(next(iter(per_photo.values())))
    return [(label, {k: float(np.mean([rows[label][k] for rows in per_photo.values()]))
                     for k in per_photo[next(iter(per_photo))][label]}) for label in labels]


def format_table(summary, count):
    lines = [f'| LR stored as (mean of {count} photos) | Y-PSNR | change vs PNG | RGB-PSNR | CIEDE2000 | '
             'LR PSNR vs PNG LR | LR bytes | codes kept |',
             '|---|---:|---:|---:|---:|---:|---:|---:|']
    for label, m in summary:
        lr_psnr = 'lossless' if label == 'PNG' else f'{m["lr_psnr"]:.2f}'
        lines.append(f'| {label} | {m["y_psnr"]:.2f} | {m["y_psnr_change"]:+.2f} | {m["rgb_psnr"]:.2f} | '
                     f'{m["ciede2000"]:.2f} | {lr_psnr} | {m["lr_bytes"]:.0f} | {100 * m["codes_kept"]:.1f} % |')
    return '\n'.join(lines) + '\n'


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--opt', help='options YAML with the network (and its weights in path:pretrain_network_g)')
    parser.add_argument('--weights', help='VQIR weights (the released configuration for --scale without --opt)')
    parser.add_argument('--scale', type=int, choices=(16, 32))
    parser.add_argument('--images', default=osp.join(ROOT, 'datasets', 'demo', 'val'),
                        help='photos (files or folders; default: the demo\'s held-out photos)')
    parser.add_argument('--exclude', nargs='*', default=['colorwheel'],
                        help='image names left out (default: colorwheel, a synthetic chart)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('-o', '--out', help='write <OUT>.md and <OUT>.csv')
    args = parser.parse_args(argv)
    if not args.opt and not args.weights:
        parser.error('give --opt (the demo: options/test/demo_x16.yml) or --weights')
    return args


def main(argv=None):
    use_huge_pages()  # as vqir-rescale: before the first tensor (PyTorch reads the setting once)
    args = parse_args(argv)
    rescaler_args = argparse.Namespace(opt=args.opt, weights=args.weights, scale=args.scale, device=args.device,
                                       tile=None, tile_overlap=None, command='up', bf16=False, compile=False,
                                       half=False)
    try:
        rescaler = build_rescaler(rescaler_args)
        files = [f for f in list_images(args.images) if osp.splitext(osp.basename(f))[0] not in args.exclude]
        per_photo = {osp.basename(f): measure_photo(rescaler, read_image(f)[0]) for f in files}
    except (UsageError, OptionsError, CheckpointError, ImageReadError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    summary = summarise(per_photo)
    table = format_table(summary, len(per_photo))
    print(table, end='')
    if args.out:
        atomic_write_bytes(f'{args.out}.md', table.encode('utf-8'))
        text = io.StringIO(newline='')
        writer = csv.writer(text)
        metrics = list(summary[0][1])
        writer.writerow(['photo', 'codec'] + metrics)
        for photo, rows in per_photo.items():
            for label, m in rows.items():
                writer.writerow([photo, label] + [f'{m[k]:.4f}' for k in metrics])
        for label, m in summary:
            writer.writerow(['mean', label] + [f'{m[k]:.4f}' for k in metrics])
        atomic_write_bytes(f'{args.out}.csv', text.getvalue().encode('utf-8'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
