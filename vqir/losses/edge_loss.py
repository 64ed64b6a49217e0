"""Laplacian-pyramid edge loss, used at every output level of stage 2 (reference weight 0.05).

The band-pass ("Laplacian") image of x is x minus its one-level Gaussian-pyramid reconstruction:

    g  = G * x                       (5x5 Gaussian G = k^T k, k = [.05, .25, .4, .25, .05], replicate padding)
    u  = zeros; u[..., ::2, ::2] = 4 * g[..., ::2, ::2]     (downsample 2x, zero-stuff back)
    L(x) = x - G * u

and the loss is loss_weight * L1(L(pred), L(target)).
"""
import torch
import torch.nn.functional as F
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

__all__ = ['LaplacianEdgeLoss']

_REDUCTIONS = ('none', 'mean', 'sum')
# 1-D binomial-like taps summing to 1; their outer product is the 5x5 Gaussian of the pyramid.
_GAUSS_TAPS = (0.05, 0.25, 0.4, 0.25, 0.05)


@LOSS_REGISTRY.register()
class LaplacianEdgeLoss(nn.Module):
    """L1 distance between the Laplacian (band-pass) images of prediction and target.

    Args:
        loss_weight (float): 0.05 in the reference.
        reduction (str): 'mean' (reference), 'sum' or 'none'.
    """

    def __init__(self, loss_weight=0.05, reduction='mean'):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f'LaplacianEdgeLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}.')
        self.loss_weight = loss_weight
        self.reduction = reduction
        taps = torch.tensor(_GAUSS_TAPS, dtype=torch.float32)
        # (1, 1, 5, 5); a buffer so that .to(device) moves it, not saved since it is a constant.
        self.register_buffer('kernel', torch.outer(taps, taps)[None, None], persistent=False)

    def gaussian_blur(self, img):
        """5x5 Gaussian per channel with replicate padding. (B, C, H, W) -> (B, C, H, W)."""
        channels = img.shape[1]
        pad = self.kernel.shape[-1] // 2
        kernel = self.kernel.to(img.dtype).expand(channels, 1, -1, -1)
        return F.conv2d(F.pad(img, (pad, pad, pad, pad), mode='replicate'), kernel, groups=channels)

    def laplacian(self, img):
        """Band-pass image: img minus blur(zero-stuffed 2x-downsampled blur(img)). (B, C, H, W) -> same."""
        blurred = self.gaussian_blur(img)
        stuffed = torch.zeros_like(blurred)
        # x4 keeps the mean: one sample in four survives the zero-stuffing.
        stuffed[:, :, ::2, ::2] = blurred[:, :, ::2, ::2] * 4
        return img - self.gaussian_blur(stuffed)

    def forward(self, pred, target):
        """
        Args:
            pred (Tensor): (B, C, H, W), a refined output level (e.g. Level_2).
            target (Tensor): (B, C, H, W), the HR image at that level.

        Returns:
            Tensor: scalar (or (B, C, H, W) with reduction 'none').
        """
        if pred.shape != target.shape:
            raise ValueError(
                f'LaplacianEdgeLoss: pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}.')
        return self.loss_weight * F.l1_loss(self.laplacian(pred), self.laplacian(target), reduction=self.reduction)
