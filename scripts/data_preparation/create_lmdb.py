#!/usr/bin/env python
"""Pack a folder of images into an lmdb database (basicsr's format) for fast random reads.

    python scripts/data_preparation/create_lmdb.py --input datasets/DIV2K/DIV2K_train_HR_sub \\
        --output datasets/DIV2K/DIV2K_train_HR_sub.lmdb

Each image is read as everything in the project reads images (``vqir.utils.image_io``: EXIF
orientation applied, broken files refused with their name) and stored PNG-encoded (bit depth, grey
and alpha kept) under the key "its path relative to --input, without extension";
<output>/meta_info.txt lists "<key>.png (h,w,c) <compression>" per image, which is where the
datasets (`io_backend: {type: lmdb}`) find the keys: the layout of basicsr's
``make_lmdb_from_imgs``, whose own reader (``cv2.imread``) would ignore the orientation. The
database is built under a temporary name and renamed when complete, so a failed run leaves nothing.
"""
import argparse
import os
import shutil
import sys
from collections import Counter
from multiprocessing import Pool
from os import path as osp

import lmdb
from PIL import Image
from tqdm import tqdm

from vqir.utils.image_io import ImageReadError, encode_image, list_image_files, read_image

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
                        help='processes that read and encode the images (default 1)')
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


def encode_one(job):
    """(path, key, compress level) -> (key, PNG bytes, (h, w, c)); raises ImageReadError naming the file."""
    path, key, compress_level = job
    img, info = read_image(path)
    png = encode_image(f'{key}.png', img, info=info, bit_depth=info.bit_depth, png_compression=compress_level)
    channels = {'gray': 1, 'rgb': 3, 'rgba': 4}[info.mode]
    return key, png, img.shape[:2] + (channels, )


def main(argv=None):
    args = parse_args(argv)
    jobs = [(osp.join(args.input, path), key, args.compress_level) for path, key in zip(args.images, args.keys)]
    tmp_output = f'{args.output}.tmp{os.getpid()}'
    pool = Pool(args.n_thread) if args.n_thread > 1 else None
    try:
        env = lmdb.open(tmp_output, map_size=args.map_size)
        txn = env.begin(write=True)
        meta = []
        encoded = pool.imap(encode_one, jobs, chunksize=8) if pool else map(encode_one, jobs)
        for index, (key, png, (h, w, c)) in enumerate(tqdm(encoded, total=len(jobs), unit='image', desc='Pack')):
            txn.put(key.encode('ascii'), png)
            meta.append(f'{key}.png ({h},{w},{c}) {args.compress_level}\n')
            if (index + 1) % args.batch == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
        env.close()
        with open(osp.join(tmp_output, 'meta_info.txt'), 'w', encoding='ascii') as f:
            f.writelines(meta)
        os.rename(tmp_output, args.output)
    except ImageReadError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(tmp_output, ignore_errors=True)
    print(f'{len(args.keys)} images in {args.output} (keys in {osp.join(args.output, "meta_info.txt")})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
