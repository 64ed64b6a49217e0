#!/usr/bin/env python
"""Make MATLAB-bicubic (antialiased) LR images of a folder of HR images at several scales.

    python scripts/data_preparation/generate_bicubic_lr.py --input datasets/DIV2K/DIV2K_valid_HR \\
        --output datasets/DIV2K/DIV2K_valid_LR_bicubic --scales 16 32

writes <output>/X16/<name>.png, <output>/X32/<name>.png, ... with the names of the HR files, so
that a dataset with `dataroot_lq: <output>/X16` and `ir_scale: 16` pairs them. The resize is
basicsr's `imresize` (MATLAB's `imresize(img, 1/s, 'bicubic')`), the LR the IFRM is guided to and
the field's metrics assume.

Sides that are not multiples of the scale: by default the HR is reflect-padded at the bottom and
right to the next multiple first, so the LR is ceil(H/s) x ceil(W/s) and equals what the datasets
compute on the fly (and what the model sees, since it pads the same way). With --mod-crop the HR
is instead cropped to a multiple (bottom rows and right columns removed), as the reference does;
such LR files pair with datasets that set `mod_crop: true`.

HR images are read as everything in the project reads them (``vqir.utils.image_io``: EXIF
orientation applied, so the LR matches what the datasets and ``vqir-rescale`` see). Output: PNG,
3 channels (grayscale replicated, alpha dropped), 16 bit for 16-bit inputs and 8 bit otherwise.
"""
import argparse
import os
import sys
from collections import Counter
from multiprocessing import Pool
from os import path as osp

from tqdm import tqdm

from vqir.data import transforms
from vqir.utils.image_io import ImageReadError, list_image_files, read_image, write_image
from vqir.utils.img_util import pad_to_multiple


def downscale_one(job):
    """Make all LR versions of one HR image; returns (relative path, error message naming the file, or None)."""
    rel_path, args = job
    src = osp.join(args.input, rel_path)
    try:
        rgb, info = read_image(src)
    except ImageReadError as error:
        return rel_path, str(error)
    img = rgb  # the resize treats the channels alike, so their order does not matter here
    for scale in args.scales:
        hr = transforms.mod_crop(img, scale) if args.mod_crop else pad_to_multiple(img, scale)
        if hr.shape[0] == 0 or hr.shape[1] == 0:
            return rel_path, f'{src}: {img.shape[0]}x{img.shape[1]} is smaller than the scale {scale}'
        lr = transforms.bicubic_downscale(hr, scale)
        dst = osp.join(args.output, f'X{scale}', osp.splitext(rel_path)[0] + '.png')
        try:  # atomic: an interrupted run leaves no truncated LR that training would read later
            write_image(dst, lr, bit_depth=info.bit_depth, png_compression=args.compression_level)
        except OSError as error:
            return rel_path, f'{dst}: cannot be written ({error.strerror or error})'
    return rel_path, None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', required=True, help='folder of HR images (searched recursively)')
    parser.add_argument('--output', required=True, help='root folder; one X<scale> sub-folder per scale')
    parser.add_argument('--scales', type=int, nargs='+', default=[16, 32], help='downscaling factors (default 16 32)')
    parser.add_argument('--mod-crop', action='store_true',
                        help='crop the HR to a multiple of the scale instead of reflect-padding it')
    parser.add_argument('--n-thread', type=int, default=min(8, os.cpu_count() or 1), help='worker processes')
    parser.add_argument('--compression-level', type=int, default=3, help='PNG compression 0-9 (default 3)')
    args = parser.parse_args(argv)
    if any(scale < 2 for scale in args.scales):
        parser.error(f'--scales must be integers >= 2, got {args.scales}')
    args.scales = sorted(set(args.scales))
    if args.n_thread <= 0:
        parser.error('--n-thread must be positive')
    if not 0 <= args.compression_level <= 9:
        parser.error(f'--compression-level must be in 0..9, got {args.compression_level}')
    for scale in args.scales:
        folder = osp.join(args.output, f'X{scale}')
        if osp.isdir(folder) and os.listdir(folder):
            parser.error(f'output folder is not empty: {folder} (remove it first)')
    try:
        args.images = list_image_files(args.input)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    duplicates = [stem for stem, n in Counter(osp.splitext(p)[0] for p in args.images).items() if n > 1]
    if duplicates:
        parser.error(f'input images share the name {duplicates[0]!r} (their LR files would collide)')
    return args


def main(argv=None):
    args = parse_args(argv)
    settings = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != 'images'})
    jobs = [(rel_path, settings) for rel_path in args.images]
    failures = []
    with tqdm(total=len(jobs), unit='image', desc=f'Bicubic x{"/".join(map(str, args.scales))}') as pbar:
        pool = Pool(args.n_thread, initializer=_single_thread) if args.n_thread > 1 else None
        results = pool.imap_unordered(downscale_one, jobs) if pool else map(downscale_one, jobs)
        for rel_path, error in results:
            if error:
                failures.append(error)
            pbar.update(1)
        if pool is not None:
            pool.close()
            pool.join()
    for scale in args.scales:
        print(f'X{scale}: {len(jobs) - len(failures)} LR images in {osp.join(args.output, f"X{scale}")}')
    for failure in sorted(failures):
        print(f'error: {failure}', file=sys.stderr)
    return 1 if failures else 0


def _single_thread():
    # each worker process resizes one image at a time; torch threads would only compete
    import torch
    torch.set_num_threads(1)


if __name__ == '__main__':
    sys.exit(main())
