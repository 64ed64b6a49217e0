"""Tiles of an image too large for one piece, and the blending of their outputs (see
:mod:`vqir.inference` for how the Rescaler uses them).

Cores are disjoint spans covering the (padded) image; each tile also sees ``overlap`` HR pixels of
context around its core. Outputs are blended with raised-cosine weights across each boundary
between cores, over ``overlap`` pixels centred on it, at the resolution of each output (1/16 for
features, full resolution for images), so seams do not show and every pixel's weights sum to 1.
"""
import math
from collections import OrderedDict

import torch

__all__ = ['tile_spans', 'raised_cosine', 'blend_weights_1d', 'Tile', 'TileBlender']


def tile_spans(length, tile, align):
    """Core spans [(start, end)] covering [0, length), multiples of ``align``, each at most ``tile``.

    ``length`` is a multiple of ``align``. Spans are as even as possible (sizes differ by at most
    ``align``; the larger ones last, as in the reference).
    """
    if not tile or tile >= length:
        return [(0, length)]
    units, tile_units = length // align, tile // align
    count = math.ceil(units / tile_units)
    base, extra = divmod(units, count)
    spans, start = [], 0
    for i in range(count):
        size = (base + (1 if i >= count - extra else 0)) * align
        spans.append((start, start + size))
        start += size
    return spans


def raised_cosine(t):
    """Raised cosine: 0 for t <= 0, 1 for t >= 1; ramp(t) + ramp(1 - t) = 1."""
    t = t.clamp(0., 1.)
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def blend_weights_1d(core, ext, length, overlap, factor, device):
    """Weights of one tile along one axis, at resolution 1/factor, over its extended span ``ext``.

    Pixel j (of the 1/factor grid) covers HR coordinates [j*factor, (j+1)*factor); its weight is
    taken at the pixel centre. 1 inside the core away from neighbours; a raised-cosine ramp over
    ``[boundary - overlap/2, boundary + overlap/2]`` at every boundary with a neighbouring core;
    0 beyond (the outer half of the context). Without overlap: 1 inside the core, 0 outside.
    """
    (c0, c1), (e0, e1) = core, ext
    centres = (torch.arange(e0 // factor, e1 // factor, device=device, dtype=torch.float32) + 0.5) * factor
    if overlap == 0:
        return ((centres >= c0) & (centres < c1)).float()
    weight = torch.ones_like(centres)
    if c0 > 0:
        weight = weight * raised_cosine((centres - (c0 - overlap / 2)) / overlap)
    if c1 < length:
        weight = weight * raised_cosine(((c1 + overlap / 2) - centres) / overlap)
    return weight


class Tile:
    """One tile: its core and extended (core + context) spans in HR pixels of the padded image."""

    def __init__(self, core_y, core_x, ext_y, ext_x):
        self.core_y, self.core_x, self.ext_y, self.ext_x = core_y, core_x, ext_y, ext_x

    def region(self, factor):
        """Slices of the extended span at resolution 1/factor."""
        return (slice(self.ext_y[0] // factor, self.ext_y[1] // factor),
                slice(self.ext_x[0] // factor, self.ext_x[1] // factor))


class TileBlender:
    """Accumulates tile outputs ``(B, C, h, w)`` at resolution 1/factor with blending weights."""

    def __init__(self, size, overlap):
        self.size, self.overlap = size, overlap  # padded HR (H, W)
        self.sums = OrderedDict()  # name -> (weighted sum, weight sum, factor)

    def add(self, name, tile, out, factor):
        height, width = self.size
        wy = blend_weights_1d(tile.core_y, tile.ext_y, height, self.overlap, factor, out.device)
        wx = blend_weights_1d(tile.core_x, tile.ext_x, width, self.overlap, factor, out.device)
        weight = wy[:, None] * wx[None, :]
        if name not in self.sums:
            b, c = out.shape[:2]
            self.sums[name] = (out.new_zeros((b, c, height // factor, width // factor), dtype=torch.float32),
                               out.new_zeros((height // factor, width // factor), dtype=torch.float32), factor)
        total, weight_sum, _ = self.sums[name]
        ys, xs = tile.region(factor)
        total[:, :, ys, xs] += out.float() * weight
        weight_sum[ys, xs] += weight

    def result(self):
        # every pixel lies in exactly one core, where its tile's weight is positive
        return OrderedDict((name, total / weight_sum) for name, (total, weight_sum, _) in self.sums.items())
