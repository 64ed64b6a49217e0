#!/usr/bin/env python
"""Pack a folder of images into an lmdb database (basicsr's format) for fast random reads.

    python scripts/create_lmdb.py --input datasets/DIV2K/DIV2K_train_HR_sub \\
        --output datasets/DIV2K/DIV2K_train_HR_sub.lmdb

Each image is stored PNG-encoded (bit depth and channels kept) under the key "its path relative
to --input, without extension"; <output>/meta_info.txt lists "<key>.png (h,w,c) <compression>"
per image, which is where the datasets (`io_backend: {type: lmdb}`) find the keys. Built on
basicsr.utils.lmdb_util.make_lmdb_from_imgs.
"""
import argparse
import os
import sys
from collections import Counter
from os import path as osp

from PIL import Image

import vqir  # noqa: F401  (must precede basicsr: it installs the torchvision shim basicsr needs)
from basicsr.utils.lmdb_util import make_lmdb_from_imgs
from vqir.data.transforms import list_image_files

# Bytes per pixel of the largest image type handled (RGBA, 16 bit): an upper bound of an image's
# PNG size, used to size the lmdb map (address space only; the file grows with its content).
_MAX_BYTES_PER_PIXEL = 8
_MAP_SIZE_MARGIN = 64 * 1024**2


def lmdb_keys(rel_paths):
    """Keys (relative path without extension) of the images; they must be unique ASCII without spaces."""
    keys = [osp.splitext(p)[0].replace(os.sep, '/') for p in rel_paths]
    for key, rel_path in zip(keys, rel_paths):
        if not key.isascii() or any(c.isspace() for c in key):
            raise ValueError(f'image name is not an ASCII name without spaces, as lmdb keys need: {rel_path}')
    duplicates = [key for key, n in Counter(keys).items() if n > 1]
    if duplicates:
        raise ValueError(f'several images would share the lmdb key {duplicates[0]!r} (same name, other extension)')
    return keys


def estimate_map_size(folder, rel_paths):
    """lmdb map size that surely holds the images, from their headers (no decoding)."""
    pixels = 0
    for rel_path in rel_paths:
        path = osp.join(folder, rel_path)
        try:
            with Image.open(path) as img:
                pixels += img.width * img.height
        except OSError as error:
            raise ValueError(f'cannot read image file: {path} ({error})') from error
    return pixels * _MAX_BYTES_PER_PIXEL + _MAP_SIZE_MARGIN


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', required=True, help='folder of images (searched recursively)')
    parser.add_argument('--output', required=True, help="lmdb folder to create; its name must end with '.lmdb'")
    parser.add_argument('--compress-level', type=int, default=1, help='PNG compression 0-9 (default 1)')
    parser.add_argument('--batch', type=int, default=5000, help='images per lmdb transaction (default 5000)')
    parser.add_argument('--n-thread', type=int, default=1,
                        help='>1: read all images into memory first with this many processes')
    args = parser.parse_args(argv)
    args.output = args.output.rstrip('/')
    if not args.output.endswith('.lmdb'):
        parser.error(f"--output must end with '.lmdb', got {args.output}")
    if osp.exists(args.output):
        parser.error(f'output already exists: {args.output} (remove it first)')
    if not 0 <= args.compress_level <= 9:
        parser.error(f'--compress-level must be in 0..9, got {args.compress_level}')
    if args.batch <= 0 or args.n_thread <= 0:
        parser.error('--batch and --n-thread must be positive')
    try:
        args.images = list_image_files(args.input)
        args.keys = lmdb_keys(args.images)
        args.map_size = estimate_map_size(args.input, args.images)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    make_lmdb_from_imgs(
        args.input,
        args.output,
        args.images,
        args.keys,
        batch=args.batch,
        compress_level=args.compress_level,
        multiprocessing_read=args.n_thread > 1,
        n_thread=args.n_thread,
        map_size=args.map_size)
    print(f'{len(args.keys)} images in {args.output} (keys in {osp.join(args.output, "meta_info.txt")})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
