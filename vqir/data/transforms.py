"""Numpy image helpers shared by the datasets and the data-preparation scripts.

Every image handled here is a float32 array of shape (H, W, 3), BGR channel order (OpenCV's),
values in [0, 1]; the datasets swap to RGB only when they turn arrays into tensors. Images are
read and written by ``vqir.utils.image_io`` (the project's one reader and writer); ``read_bgr``
hands its result over in this module's channel order. This module has no `_dataset` suffix, so
it is not auto-imported: import it where it is needed.
"""
import random

import cv2
import numpy as np
from basicsr.utils.matlab_functions import imresize

from vqir.utils.image_io import decode_image

def read_bgr(content, name):
    """Encoded image bytes (a file's or an LMDB entry's) -> (float32 (H, W, 3) BGR in [0, 1], ImageInfo).

    Decoded by ``vqir.utils.image_io.decode_image``, as ``vqir-rescale`` decodes: EXIF orientation
    applied, grey repeated, alpha dropped, 16-bit kept; errors are one line starting with ``name``.
    """
    rgb, info = decode_image(content, name)
    return np.ascontiguousarray(rgb[:, :, ::-1]), info


def pad_reflect(img, height, width):
    """Reflect-pad (H, W, C) at the bottom and right up to at least (height, width).

    Reflection excludes the edge pixel, like `torch.nn.functional.pad(mode='reflect')`.
    """
    pad_h, pad_w = max(0, height - img.shape[0]), max(0, width - img.shape[1])
    if pad_h == 0 and pad_w == 0:
        return img
    return np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode='reflect')


def mod_crop(img, multiple):
    """Crop (H, W, C) to (H - H % m, W - W % m) by removing bottom rows and right columns."""
    height, width = img.shape[0] - img.shape[0] % multiple, img.shape[1] - img.shape[1] % multiple
    return img[:height, :width]


def bicubic_downscale(img, factor):
    """MATLAB-compatible antialiased bicubic resize by 1/factor: (H, W[, C]) -> (ceil(H/f), ceil(W/f)[, C]).

    basicsr's ``imresize`` fails when a side is shorter than its symmetric padding (about 2 to 2.5
    times the factor, e.g. a 33-pixel side at 1/16). Such images are first extended like MATLAB
    does, symmetrically and repeating the reflection as often as needed (``np.pad`` 'symmetric'),
    by 2*factor pixels (a whole number of output pixels), whose outputs are then dropped. The
    result stays within 1e-3 of what basicsr gives for sizes where both work.
    """
    factor = int(factor)
    try:
        return np.ascontiguousarray(imresize(img, 1.0 / factor), dtype=np.float32)
    except RuntimeError:
        if min(img.shape[:2]) >= 4 * factor:  # not the short-side failure: a real error
            raise
    pad = 2 * factor
    out_h, out_w = -(-img.shape[0] // factor), -(-img.shape[1] // factor)
    widths = ((pad, pad), (pad, pad)) + ((0, 0),) * (img.ndim - 2)
    small = imresize(np.pad(img, widths, mode='symmetric'), 1.0 / factor)
    return np.ascontiguousarray(small[2:2 + out_h, 2:2 + out_w], dtype=np.float32)


def random_crop_box(height, width, crop_size, align=1):
    """Random top-left corner (top, left) of a crop_size square inside (height, width).

    Corners are multiples of `align`, so that a crop of a 1/align-size image at (top/align,
    left/align) covers exactly the same area.
    """
    top = random.randint(0, (height - crop_size) // align) * align
    left = random.randint(0, (width - crop_size) // align) * align
    return top, left


def crop(img, top, left, height, width):
    """Contiguous crop of (H, W, C)."""
    return np.ascontiguousarray(img[top:top + height, left:left + width])


def random_downscale(img, factors, min_size):
    """Resize (H, W, C) by a factor drawn uniformly from `factors` (bilinear, OpenCV).

    The reference's stage-2 augmentation: with factors (1, 0.5) half of the images are shown at
    half resolution. Each side is kept at least min(side, min_size) pixels long (so that a
    min_size crop still fits and small images are never enlarged), which may change the aspect
    ratio slightly, as in the reference.
    """
    factor = random.choice(factors)
    height, width = img.shape[:2]
    new_height = max(int(height * factor), min(height, min_size))
    new_width = max(int(width * factor), min(width, min_size))
    if (new_height, new_width) == (height, width):
        return img
    return cv2.resize(img, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
