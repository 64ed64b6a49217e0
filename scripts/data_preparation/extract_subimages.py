#!/usr/bin/env python
"""Crop large HR images (DIV2K) into overlapping sub-images for faster data loading.

    python scripts/data_preparation/extract_subimages.py \\
        --input datasets/DIV2K/DIV2K_train_HR --output datasets/DIV2K/DIV2K_train_HR_sub

Windows of --crop-size pixels are taken every --step pixels along each axis (basicsr's DIV2K
recipe: 480 and 240). Where the last window leaves more than --thresh-size pixels uncovered at
the bottom or right, one more window flush with that border is added (threshold 0: the border is
always covered). Sub-image i (row-major, from 1) of `0001.png` is written as `0001_s00i.png`,
in the sub-folder the image was in. Images are read as everything in the project reads them
(``vqir.utils.image_io``: EXIF orientation applied) and keep their bit depth, grey or alpha; they
are written as PNG (lossless), each atomically. Images smaller than the crop size are skipped and reported.
"""
import argparse
import os
import sys
from multiprocessing import Pool
from os import path as osp

from tqdm import tqdm

from vqir.utils.image_io import ImageReadError, list_image_files, read_image, write_image


def window_starts(length, crop_size, step, thresh_size):
    """Start offsets of the crop windows along one axis of `length` pixels (length >= crop_size)."""
    starts = list(range(0, length - crop_size + 1, step))
    if length - (starts[-1] + crop_size) > thresh_size:
        starts.append(length - crop_size)
    return starts


def extract_one(job):
    """Crop one image; returns (relative path, sub-images written, message or None, failed)."""
    rel_path, args = job
    src = osp.join(args.input, rel_path)
    try:
        img, info = read_image(src)
    except ImageReadError as error:
        return rel_path, 0, f'error: {error}', True
    height, width = img.shape[:2]
    if height < args.crop_size or width < args.crop_size:
        return rel_path, 0, f'{src}: skipped, {height}x{width} is smaller than the crop size {args.crop_size}', False

    stem = osp.splitext(rel_path)[0]
    os.makedirs(osp.dirname(osp.join(args.output, stem)), exist_ok=True)
    index = 0
    for top in window_starts(height, args.crop_size, args.step, args.thresh_size):
        for left in window_starts(width, args.crop_size, args.step, args.thresh_size):
            index += 1
            window = (slice(top, top + args.crop_size), slice(left, left + args.crop_size))
            alpha = None if info.alpha is None else info.alpha[window]
            dst = osp.join(args.output, f'{stem}_s{index:03d}.png')
            try:
                write_image(dst, img[window], info=info, alpha=alpha, bit_depth=info.bit_depth,
                            png_compression=args.compression_level)
            except OSError as error:
                return rel_path, index - 1, f'error: {dst}: cannot be written ({error.strerror or error})', True
    return rel_path, index, None, False


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', default='datasets/DIV2K/DIV2K_train_HR', help='folder of HR images')
    parser.add_argument('--output', default='datasets/DIV2K/DIV2K_train_HR_sub',
                        help='folder for the sub-images (must not exist or be empty)')
    parser.add_argument('--crop-size', type=int, default=480, help='sub-image side in pixels (default 480)')
    parser.add_argument('--step', type=int, default=240, help='window step in pixels (default 240)')
    parser.add_argument('--thresh-size', type=int, default=0,
                        help='uncovered border width that still gets its own window (default 0)')
    parser.add_argument('--n-thread', type=int, default=min(8, os.cpu_count() or 1), help='worker processes')
    parser.add_argument('--compression-level', type=int, default=3, help='PNG compression 0-9 (default 3)')
    args = parser.parse_args(argv)
    if args.crop_size <= 0 or args.step <= 0 or args.thresh_size < 0 or args.n_thread <= 0:
        parser.error('--crop-size, --step and --n-thread must be positive and --thresh-size non-negative')
    if not 0 <= args.compression_level <= 9:
        parser.error(f'--compression-level must be in 0..9, got {args.compression_level}')
    if osp.isdir(args.output) and os.listdir(args.output):
        parser.error(f'output folder is not empty: {args.output} (remove it first)')
    try:
        args.images = list_image_files(args.input)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    settings = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != 'images'})
    jobs = [(rel_path, settings) for rel_path in args.images]
    total, messages, failures = 0, [], 0
    with tqdm(total=len(jobs), unit='image', desc='Extract') as pbar:
        if args.n_thread == 1:
            results = map(extract_one, jobs)
            pool = None
        else:
            pool = Pool(args.n_thread)
            results = pool.imap_unordered(extract_one, jobs)
        for rel_path, count, message, failed in results:
            total += count
            failures += failed
            if message:
                messages.append(message)
            pbar.update(1)
        if pool is not None:
            pool.close()
            pool.join()
    print(f'wrote {total} sub-images of {len(jobs)} images to {args.output}')
    for message in sorted(messages):
        print(message, file=sys.stderr)
    if failures:
        print(f'error: {failures} images failed', file=sys.stderr)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
