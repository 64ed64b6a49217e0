"""JPEG between the downscaler and the upscaler: LR images that survive being shared as JPEG.

An LR is stored and sent, and on the way it is often re-encoded as a JPEG. Training can put that
JPEG between the IFRM's forward pass (which makes the LR) and its inverse (which reads it):

- stage 1 (``train.lr_jpeg``): kornia's differentiable JPEG (``jpeg_codec_differentiable``, 4:2:0
  like libjpeg), so the gradient reaches the IFRM's forward pass and it learns an LR that JPEG
  does not break;
- stage 2 (``train.lr_jpeg``): the real encoder (OpenCV's libjpeg, through ``vqir.utils.image_io``):
  the IFRM is frozen and no gradient reaches the LR, so the MSRM simply learns from what a JPEG
  LR decodes to;
- validation and test (``val.lr_jpeg_quality``): the real encoder at one quality.

Each training sample's quality is drawn uniformly from ``quality: [low, high]``; with ``prob`` < 1
the other samples keep their LR as it is.
"""
import numpy as np
import torch

from vqir.utils.image_io import decode_image, encode_image

__all__ = ['LRJPEG', 'real_jpeg', 'check_lr_jpeg_options']


def real_jpeg(lr01, quality):
    """(B, 3, h, w) RGB in [0, 1] on the 8-bit grid -> what JPEG files of ``quality`` (a number, or
    one per image) decode to, same shape, device and dtype."""
    qualities = [quality] * lr01.shape[0] if np.isscalar(quality) else list(quality)
    out = []
    for img, q in zip(lr01.detach().float().cpu(), qualities):
        data = encode_image('lr.jpg', img, quality=int(round(float(q))))
        rgb, _ = decode_image(data, 'the JPEG of an LR')
        out.append(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))))
    return torch.stack(out).to(device=lr01.device, dtype=lr01.dtype)


def check_lr_jpeg_options(opt):
    """``train.lr_jpeg`` -> (low, high, prob); ValueError naming what is wrong."""
    if not isinstance(opt, dict) or set(opt) - {'quality', 'prob'}:
        raise ValueError(f'must be a mapping with quality: [low, high] and optionally prob, got {opt!r}')
    quality = opt.get('quality')
    if (not isinstance(quality, (list, tuple)) or len(quality) != 2
            or not all(isinstance(q, int) and not isinstance(q, bool) and 1 <= q <= 100 for q in quality)
            or quality[0] > quality[1]):
        raise ValueError(f'quality must be [low, high], integers with 1 <= low <= high <= 100, got {quality!r}')
    prob = opt.get('prob', 1.0)
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 < prob <= 1:
        raise ValueError(f'prob must be a number in (0, 1], got {prob!r}')
    return quality[0], quality[1], float(prob)


class LRJPEG:
    """The JPEG of ``train.lr_jpeg`` for a batch of LRs.

    Args:
        quality: [low, high]: each sample's quality is drawn uniformly from this range.
        prob: the share of samples that go through a JPEG.
        differentiable: kornia's differentiable codec (stage 1) or the real one (stage 2).
    """

    def __init__(self, quality, prob=1.0, differentiable=True):
        self.low, self.high, self.prob = check_lr_jpeg_options({'quality': list(quality), 'prob': prob})
        self.differentiable = differentiable

    def __call__(self, lr01):
        """(B, 3, h, w) RGB in [0, 1] -> the LRs as the upscaler receives them."""
        batch = lr01.shape[0]
        qualities = torch.empty(batch).uniform_(self.low, self.high)  # the training run's seeded RNG
        chosen = torch.rand(batch) < self.prob
        if self.differentiable:
            from kornia.enhance import jpeg_codec_differentiable
            coded = jpeg_codec_differentiable(lr01.float(), qualities.to(lr01.device)).to(lr01.dtype)
        else:
            coded = real_jpeg(lr01, qualities.round().tolist())
        return torch.where(chosen.to(lr01.device)[:, None, None, None], coded, lr01)
