"""8-bit quantisation of the downscaled image (the LR a user stores as an ordinary PNG)."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def eight_bit_levels(dtype=torch.float32, device='cpu'):
    """The 256 values an 8-bit image gives in [-1, 1]: ``(k / 255 - 0.5) / 0.5``, k = 0..255, ``(256,)``.

    Computed on the CPU with true division, exactly as an image reader does (uint8 -> float /
    255, then normalise), and only then moved to ``device``: CUDA divides by a scalar through
    its reciprocal, which would make about 100 of the 256 values differ by one ulp.
    """
    with torch.inference_mode(False):  # a normal tensor even when first asked for in inference mode
        levels = (torch.arange(256, dtype=dtype) / 255. - 0.5) / 0.5
        return levels.to(device)


def quantize_lr(lr, noise=False):
    """Snap an LR image in [-1, 1] to the 256 levels of an 8-bit image, or simulate that with noise.

    The image is mapped to [0, 255]; then either

    * ``noise=False`` (inference, and stage 2 always): rounded (``torch.round``, half to even),
      clamped to [0, 255] and replaced by the level's value from :func:`eight_bit_levels`, so
      that an LR written to an 8-bit PNG and read back (``k / 255``, then ``(x - 0.5) / 0.5``)
      is bit-identical to this tensor on any device. NaN stays NaN. Rounding has no useful
      gradient, so this result is not differentiable (it carries no autograd history);
    * ``noise=True`` (stage-1 training): uniform noise U(-0.5, 0.5) is added instead, a
      differentiable stand-in for rounding (the gradient passes through unchanged), then the
      values are clamped to [0, 255] and mapped back to [-1, 1].

    Args:
        lr: (B, C, h, w) float tensor in [-1, 1] (values outside are clamped).
        noise: add uniform noise instead of rounding. The noise is drawn on ``lr``'s device
            from that device's global generator (seed with ``torch.manual_seed``).

    Returns:
        Tensor of ``lr``'s shape, dtype and device, in [-1, 1].
    """
    x = (lr + 1.) / 2. * 255.
    if noise:
        x = x + torch.empty_like(x).uniform_(-0.5, 0.5)
        x = torch.clamp(x, 0., 255.)
        return (x / 255. - 0.5) / 0.5
    with torch.no_grad():
        k = torch.clamp(torch.round(x), 0., 255.)
        nan = torch.isnan(k)
        levels = eight_bit_levels(lr.dtype, lr.device)[k.masked_fill(nan, 0.).long()]
        return levels.masked_fill(nan, float('nan'))
