"""Numpy image helpers shared by the datasets and the data-preparation scripts.

Every image handled here is a float32 array of shape (H, W, 3), BGR channel order (OpenCV's),
values in [0, 1]; the datasets swap to RGB only when they turn arrays into tensors. This module
has no `_dataset` suffix, so it is not auto-imported: import it where it is needed.
"""
import os
import random
from os import path as osp

import cv2
import numpy as np
from basicsr.utils.matlab_functions import imresize

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')

# Integer dtypes are scaled by their full range, never by the values an image happens to hold
# (a dark 16-bit image must not be mistaken for an 8-bit one).
_INTEGER_RANGES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def list_image_files(folder):
    """Image files below `folder` (recursive), as sorted paths relative to `folder`.

    Hidden files and folders are skipped. Raises FileNotFoundError if `folder` does not exist
    and ValueError if it holds no image file.
    """
    if not osp.isdir(folder):
        raise FileNotFoundError(f'image folder does not exist: {folder}')
    rel_paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in files:
            if not name.startswith('.') and name.lower().endswith(IMG_EXTENSIONS):
                rel_paths.append(osp.relpath(osp.join(root, name), folder))
    if not rel_paths:
        raise ValueError(f'no image files ({", ".join(IMG_EXTENSIONS)}) found in folder: {folder}')
    return sorted(rel_paths)


def decode_image(content, name):
    """Decode encoded image bytes (PNG, JPEG, ...) without changing bit depth or channels.

    Returns the raw array as OpenCV gives it: (H, W) or (H, W, C), BGR(A), dtype of the file.
    `name` (a path or lmdb key) only serves the error message.
    """
    if content is None or len(content) == 0:
        raise ValueError(f'image is empty: {name}')
    try:
        img = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # OpenCV asserts on headers beyond CV_IO_MAX_IMAGE_PIXELS (decompression bombs)
        raise ValueError(f'cannot decode image: its header claims more pixels than OpenCV allows '
                         f'(possible decompression bomb): {name}') from None
    if img is None:
        raise ValueError(f'cannot decode image (corrupt or unsupported format): {name}')
    return img


def to_float_bgr(img, name):
    """Raw decoded image -> float32 (H, W, 3) BGR in [0, 1].

    Grayscale becomes three equal channels, an alpha channel is dropped, integer images are
    divided by the maximum of their dtype (255 for 8 bit, 65535 for 16 bit) and float images
    are clipped to [0, 1].
    """
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 2:  # gray + alpha
        img = np.repeat(img[:, :, :1], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:  # BGRA
        img = img[:, :, :3]
    elif img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'unsupported image shape {img.shape}: {name}')

    if img.dtype in _INTEGER_RANGES:
        img = img.astype(np.float32) / np.float32(_INTEGER_RANGES[img.dtype])
    elif np.issubdtype(img.dtype, np.floating):
        img = np.clip(img.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f'unsupported image dtype {img.dtype} (expected uint8, uint16 or float): {name}')
    return np.ascontiguousarray(img)


def read_image_file(path):
    """Read an image file from disk as float32 (H, W, 3) BGR in [0, 1]."""
    try:
        with open(path, 'rb') as f:
            content = f.read()
    except OSError as error:
        raise OSError(f'cannot read image file: {path} ({error.strerror or error})') from error
    return to_float_bgr(decode_image(content, path), path)


def bit_depth_dtype(img):
    """The integer dtype to write a float result of a raw decoded image back in (uint8 or uint16)."""
    return np.uint16 if img.dtype == np.uint16 else np.uint8


def float_to_integer(img, dtype):
    """float [0, 1] -> uint8 / uint16 with rounding (the inverse of `to_float_bgr`'s scaling)."""
    top = _INTEGER_RANGES[np.dtype(dtype)]
    return np.clip(np.round(img * top), 0, top).astype(dtype)


def pad_reflect(img, height, width):
    """Reflect-pad (H, W, C) at the bottom and right up to at least (height, width).

    Reflection excludes the edge pixel, like `torch.nn.functional.pad(mode='reflect')`.
    """
    pad_h, pad_w = max(0, height - img.shape[0]), max(0, width - img.shape[1])
    if pad_h == 0 and pad_w == 0:
        return img
    return np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode='reflect')


def pad_to_multiple(img, multiple):
    """Reflect-pad (H, W, C) at the bottom and right to (ceil(H/m)*m, ceil(W/m)*m)."""
    height = -(-img.shape[0] // multiple) * multiple
    width = -(-img.shape[1] // multiple) * multiple
    return pad_reflect(img, height, width)


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
