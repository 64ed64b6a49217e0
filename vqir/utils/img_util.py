"""The image conventions every part of vqir shares: what a network sees, and sides padded to a multiple.

Datasets, metrics and files hold RGB images in [0, 1]; the networks (VQGAN, IFRM, MSRM) work in
[-1, 1], as taming's VQGAN was trained, in RGB, or in BGR where ``network_color: bgr`` reproduces
the reference's stage-1 quirk (its released stage-1 weights expect BGR).
"""
import numpy as np
import torch.nn.functional as F

__all__ = ['NETWORK_COLORS', 'check_network_color', 'to_network', 'from_network', 'pad_to_multiple']

NETWORK_COLORS = ('rgb', 'bgr')


def check_network_color(network_color):
    """ValueError unless ``network_color`` is 'rgb' or 'bgr'."""
    if network_color not in NETWORK_COLORS:
        raise ValueError(f"network_color must be 'rgb' or 'bgr', got {network_color!r}")


def to_network(img, network_color='rgb'):
    """(B, 3, H, W) RGB in [0, 1] -> what the network sees: [-1, 1], RGB (or BGR)."""
    x = img * 2 - 1
    return x.flip(1) if network_color == 'bgr' else x


def from_network(x, network_color='rgb'):
    """Network output in [-1, 1] -> (B, 3, H, W) RGB in [0, 1] (not clamped: saving clamps)."""
    x = x.flip(1) if network_color == 'bgr' else x
    return (x + 1) / 2


def pad_to_multiple(img, multiple):
    """Pad at the bottom and right to sides that are multiples of ``multiple``, mirroring the border.

    Args:
        img (Tensor | ndarray): a tensor (..., H, W) or an image array (H, W, C).
        multiple (int): e.g. the VQGAN's 16 or the rescaling factor.

    Returns:
        The same kind of image, (ceil(H/m)*m, ceil(W/m)*m) in its spatial sides: reflect padding
        (the edge pixel is not repeated), or repeating the edge where a side is not longer than its
        pad (an image only a few pixels wide cannot be reflected).
    """
    h, w = img.shape[:2] if isinstance(img, np.ndarray) else img.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return img
    reflect = pad_h < h and pad_w < w
    if isinstance(img, np.ndarray):  # numpy pads every dtype (torch's reflection not 16-bit integers)
        pads = ((0, pad_h), (0, pad_w)) + ((0, 0), ) * (img.ndim - 2)
        return np.pad(img, pads, mode='reflect' if reflect else 'edge')
    if img.dim() == 3 and not reflect:  # replicate pads batched images only
        return F.pad(img[None], (0, pad_w, 0, pad_h), mode='replicate')[0]
    return F.pad(img, (0, pad_w, 0, pad_h), mode='reflect' if reflect else 'replicate')
