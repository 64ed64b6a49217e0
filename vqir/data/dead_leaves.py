"""Procedural "dead leaves" images: occluding discs of random colour and size.

Dead-leaves images share the statistics that matter to low-level vision with natural photos
(scale invariance from power-law radii, sharp occlusion edges, flat and shaded regions) and
contain every colour, so a network can learn from them what a few photos cannot teach
(Baradad et al., "Learning to See by Looking at Noise", NeurIPS 2021; Achddou et al., "Synthetic
images as a regularity prior for image restoration neural networks", SSVM 2021).

Images are float32 (H, W, 3) BGR in [0, 1], like every image of :mod:`vqir.data.transforms`.
This module has no `_dataset` suffix, so it is not auto-imported.
"""
import cv2
import numpy as np

__all__ = ['dead_leaves']


def dead_leaves(size, rng=np.random, min_radius=None, max_radius=None, alpha=3.0, num_discs=600):
    """A square dead-leaves image.

    Args:
        size (int): side in pixels.
        rng: ``np.random`` or a ``np.random.RandomState`` (``uniform``, ``normal``).
        min_radius, max_radius: disc radii in pixels (defaults: size / 16 and size / 2). Large
            discs keep their colour after a strong downscaling, which is what a 16x rescaler
            can carry; smaller ones would only average to grey.
        alpha: radii follow p(r) ~ r**-alpha (3: scale invariance in 2D).
        num_discs: discs painted back to front over a background of random colour; later discs
            occlude earlier ones, so the front layers are a dead-leaves sample.

    Returns:
        float32 (size, size, 3) in [0, 1]. Each disc has a random colour with a gentle linear
        shading; the image is painted at twice the size and area-averaged down, which anti-aliases
        the edges.
    """
    min_radius = size / 16 if min_radius is None else min_radius
    max_radius = size / 2 if max_radius is None else max_radius
    scale = 2  # supersampling
    side = size * scale
    img = np.empty((side, side, 3), np.float32)
    img[:] = rng.uniform(0, 1, size=3)
    # inverse-CDF sampling of the power law between min_radius and max_radius
    lo, hi = min_radius**(1 - alpha), max_radius**(1 - alpha)
    for _ in range(num_discs):
        radius = (lo + rng.uniform() * (hi - lo))**(1 / (1 - alpha)) * scale
        cx, cy = rng.uniform(0, side), rng.uniform(0, side)
        top, bottom = max(int(cy - radius), 0), min(int(cy + radius) + 1, side)
        left, right = max(int(cx - radius), 0), min(int(cx + radius) + 1, side)
        yy, xx = np.ogrid[top:bottom, left:right]
        dy, dx = (yy - cy) / side, (xx - cx) / side
        inside = (dx**2 + dy**2) <= (radius / side)**2  # only the disc's bounding box is touched
        colour = rng.uniform(0, 1, size=3)
        colour += (colour.mean() - colour) * rng.uniform()  # from grey to fully saturated, as photos vary
        gradient = rng.normal(0, 1.0, size=2)
        shade = 1 + gradient[0] * dx + gradient[1] * dy  # at most a few percent across a disc
        patch = np.clip(colour[None, None, :] * shade[..., None], 0, 1)
        img[top:bottom, left:right][inside] = patch[inside]
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
