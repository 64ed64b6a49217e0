"""Colour augmentation: a random 3x3 colour matrix (hue rotation, saturation, exposure, channel order).

A network trained on a handful of photos sees only their palettes (skin, brown coffee, blue sky)
and learns to paint every image in them. Rotating the hue, scaling the saturation and the exposure,
and permuting the channels show it every colour at every texture, so that colour becomes something
it copies from the input rather than something it remembers.

Images are float32 (H, W, 3) BGR in [0, 1] (see :mod:`vqir.data.transforms`). Every transform is
linear in RGB, so one matrix applies to an HR crop and its LR alike; the result is clipped to [0, 1].
This module has no `_dataset` suffix, so it is not auto-imported.
"""
import math

import numpy as np

__all__ = ['ColorAugment', 'parse_color_augment']

# BT.601 luma/chroma axes of RGB (rows: Y, Cb, Cr without offsets or range scaling)
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC_TO_RGB = np.linalg.inv(_RGB_TO_YCC)
_KEYS = ('hue', 'saturation', 'exposure', 'channel_shuffle', 'prob')


def _range(value, key, owner, lower):
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not lower <= value[0] <= value[1]):
        raise ValueError(f"{owner}: color_augment '{key}' must be [low, high] with {lower} <= low <= high, "
                         f'got {value!r}')
    return float(value[0]), float(value[1])


def parse_color_augment(opt, owner):
    """The dataset option ``color_augment`` -> a :class:`ColorAugment`, or None when absent or false.

    Keys (all optional; a key left out does nothing):
        hue (bool): rotate the hue by a uniform random angle.
        saturation ([low, high]): scale the chroma by a uniform factor from the range.
        exposure ([low, high]): multiply by 2**e, e uniform in the range (stops).
        channel_shuffle (bool): put R, G, B in a random order.
        prob (float): probability that a sample is augmented at all (default 1).
    """
    if opt is None or opt is False:
        return None
    if not isinstance(opt, dict):
        raise ValueError(f"{owner}: 'color_augment' must be a dict of {', '.join(_KEYS)}, got {opt!r}")
    unknown = sorted(set(opt) - set(_KEYS))
    if unknown:
        raise ValueError(f"{owner}: unknown color_augment key(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(_KEYS)}")
    for key in ('hue', 'channel_shuffle'):
        if not isinstance(opt.get(key, False), bool):
            raise ValueError(f"{owner}: color_augment '{key}' must be true or false, got {opt[key]!r}")
    prob = opt.get('prob', 1.0)
    if not isinstance(prob, (int, float)) or isinstance(prob, bool) or not 0 <= prob <= 1:
        raise ValueError(f"{owner}: color_augment 'prob' must be a number in [0, 1], got {prob!r}")
    saturation = _range(opt['saturation'], 'saturation', owner, 0.0) if 'saturation' in opt else None
    exposure = _range(opt['exposure'], 'exposure', owner, -math.inf) if 'exposure' in opt else None
    return ColorAugment(hue=opt.get('hue', False), saturation=saturation, exposure=exposure,
                        channel_shuffle=opt.get('channel_shuffle', False), prob=float(prob))


class ColorAugment:
    """Draws one random colour matrix per sample; see :func:`parse_color_augment` for the arguments."""

    def __init__(self, hue=False, saturation=None, exposure=None, channel_shuffle=False, prob=1.0):
        self.hue = hue
        self.saturation = saturation
        self.exposure = exposure
        self.channel_shuffle = channel_shuffle
        self.prob = prob

    def random_matrix(self, rng=np.random):
        """(3, 3) matrix M acting on RGB column vectors (rgb' = M rgb); the identity when not drawn."""
        if rng.uniform() >= self.prob:
            return np.eye(3)
        chroma = np.eye(2)
        if self.hue:
            angle = rng.uniform(0, 2 * math.pi)
            chroma = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        if self.saturation is not None:
            chroma = chroma * rng.uniform(*self.saturation)
        ycc = np.eye(3)
        ycc[1:, 1:] = chroma
        matrix = _YCC_TO_RGB @ ycc @ _RGB_TO_YCC
        if self.exposure is not None:
            matrix = matrix * 2.0**rng.uniform(*self.exposure)
        if self.channel_shuffle:
            matrix = matrix[rng.permutation(3)]
        return matrix

    @staticmethod
    def apply(img_bgr, matrix):
        """float32 (H, W, 3) BGR in [0, 1] -> the same with ``matrix`` applied in RGB, clipped to [0, 1]."""
        bgr_matrix = matrix[::-1, ::-1]  # the same map written for reversed channel order
        out = img_bgr.reshape(-1, 3) @ bgr_matrix.T.astype(np.float32)
        return np.clip(out, 0, 1).reshape(img_bgr.shape).astype(np.float32, copy=False)
