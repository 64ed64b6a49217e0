#!/usr/bin/env python
"""Export the colour photos bundled with scikit-image as the small demo dataset.

    python scripts/data_preparation/export_demo_data.py [--out datasets/demo]

writes <out>/train/*.png, <out>/val/*.png and <out>/select/*.png (RGB, 8 bit). No network is needed: only photos
that scikit-image ships inside its package are used. The output is deterministic (the same bytes
on every run) and the script is idempotent: files whose bytes already match are left alone.

train: astronaut, rocket, hubble_deep_field, immunohistochemistry, retina and the left
       half of the left view of the stereo motorcycle pair; photos larger than 512 pixels are
       shrunk (area averaging) so that their longer side is 512.
val:   three natural photos never trained on: chelsea (300x451, sides not multiples of 16),
       coffee (400x600) and the right part of the right motorcycle view (a region the train crop
       does not show in either view); and colorwheel (370x371), a synthetic chart that the demo
       reports on a row of its own.
select: photos in neither set, on which stage 2 picks its checkpoint (``val.keep_best``): the
       grayscale photos camera (512x512), coins (303x384) and moon (512x512), as RGB (R = G = B).
"""
import argparse
import os
import sys
from os import path as osp

import cv2
import numpy as np
from skimage import data as skdata

from vqir.utils.atomic_file import atomic_write_bytes
from vqir.utils.image_io import encode_image

MAX_SIDE = 512
PNG_COMPRESSION = 3
# Columns of the 741-pixel-wide motorcycle views. A scene point at column x in the left view is
# at x - d in the right view, with disparity d between 7 and 60 pixels here; so right-view columns
# >= 400 show scene points at left-view columns >= 407, well clear of the train crop (< 352).
MOTORCYCLE_TRAIN_COLUMNS = (0, 352)
MOTORCYCLE_VAL_COLUMNS = (400, 741)
SPLITS = ('train', 'val', 'select')
# grayscale photos: a model selection set that tells nothing of colour, but is neither trained on
# nor the photos the demo reports on
SELECT_PHOTOS = ('camera', 'coins', 'moon')


def fit_longer_side(img, max_side=MAX_SIDE):
    """Shrink (H, W, 3) uint8 so that its longer side is at most max_side (area averaging)."""
    height, width = img.shape[:2]
    longer = max(height, width)
    if longer <= max_side:
        return img
    size = (round(width * max_side / longer), round(height * max_side / longer))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def motorcycle_view(view, columns):
    left, right, _disparity = skdata.stereo_motorcycle()
    img = left if view == 'left' else right
    return img[:, columns[0]:columns[1]]


def demo_images():
    """{(split, file name): RGB uint8 (H, W, 3)} of the whole demo set."""
    train = {
        name: lambda name=name: fit_longer_side(getattr(skdata, name)())
        for name in ('astronaut', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina')
    }
    train['motorcycle_left'] = lambda: motorcycle_view('left', MOTORCYCLE_TRAIN_COLUMNS)
    val = {
        'chelsea': skdata.chelsea,
        'coffee': skdata.coffee,
        'motorcycle_right': lambda: motorcycle_view('right', MOTORCYCLE_VAL_COLUMNS),
        'colorwheel': skdata.colorwheel,
    }
    select = {name: lambda name=name: np.repeat(getattr(skdata, name)()[..., None], 3, axis=2)
              for name in SELECT_PHOTOS}
    images = {}
    for split, loaders in (('train', train), ('val', val), ('select', select)):
        for name, load in loaders.items():
            img = np.ascontiguousarray(load())
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise RuntimeError(f'scikit-image photo {name} is {img.dtype} {img.shape}, expected uint8 RGB')
            images[(split, f'{name}.png')] = img
    return images


def encode_png(img_rgb):
    """uint8 RGB -> the bytes of a PNG file (pixels exact; the compression level fixes the bytes)."""
    return encode_image('image.png', img_rgb.astype(np.float32) / 255., png_compression=PNG_COMPRESSION)


def write_if_changed(path, content):
    """Write `content` to `path` atomically unless the file already holds it; return the status word."""
    if osp.isfile(path):
        with open(path, 'rb') as f:
            if f.read() == content:
                return 'unchanged'
        status = 'updated'
    else:
        status = 'written'
    atomic_write_bytes(path, content)
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='datasets/demo', help='output folder (default: datasets/demo)')
    args = parser.parse_args(argv)

    images = demo_images()
    for split in SPLITS:
        os.makedirs(osp.join(args.out, split), exist_ok=True)
    for (split, name), img in images.items():
        path = osp.join(args.out, split, name)
        status = write_if_changed(path, encode_png(img))
        print(f'{status:9s} {path}  ({img.shape[0]}x{img.shape[1]})')
    counts = ', '.join(f'{sum(s == split for s, _ in images)} {split}' for split in SPLITS)
    print(f'demo set in {args.out}: {counts} images')
    return 0


if __name__ == '__main__':
    sys.exit(main())
