"""Stage-1 losses: training the invertible feature recovery module (IFRM) on a frozen VQGAN.

The IFRM maps the quantised VQGAN features z_q (B, 256, H/16, W/16) to an image-like LR and
back. Three terms supervise it (reference weights in brackets):

- ``LRGuidanceLoss``     MSE(LR, bicubic HR↓)            [0.5]  keeps the LR a viewable image;
- ``FeatureRecoveryLoss`` MSE(ẑ, z_q)                    [1.0]  the reverse pass recovers the features;
- ``GramLoss``           MSE(Gram(ẑ), Gram(z_q))          [1.0]  ... and their position-to-position
  correlations.
"""
import torch.nn.functional as F
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

__all__ = ['LRGuidanceLoss', 'FeatureRecoveryLoss', 'GramLoss', 'position_gram_matrix']

_REDUCTIONS = ('none', 'mean', 'sum')


def _check_same_shape(pred, target, loss_name):
    if pred.shape != target.shape:
        raise ValueError(f'{loss_name}: pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}.')


class _WeightedMSE(nn.Module):
    """loss_weight * MSE(pred, target) with a basicsr reduction ('mean' = mean over all elements)."""

    def __init__(self, loss_weight, reduction):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f'{type(self).__name__}: reduction must be one of {_REDUCTIONS}, got {reduction!r}.')
        self.loss_weight = loss_weight
        self.reduction = reduction

    def forward(self, pred, target):
        _check_same_shape(pred, target, type(self).__name__)
        return self.loss_weight * F.mse_loss(pred, target, reduction=self.reduction)


@LOSS_REGISTRY.register()
class LRGuidanceLoss(_WeightedMSE):
    """Guidance of the IFRM's LR towards the bicubic-downscaled HR.

    ``loss_weight * mean((lr - lr_bicubic) ** 2)`` (with reduction 'mean').

    Args:
        loss_weight (float): 0.5 in the reference.
        reduction (str): 'mean' (reference), 'sum' or 'none'.
    """

    def __init__(self, loss_weight=0.5, reduction='mean'):
        super().__init__(loss_weight, reduction)

    def forward(self, lr, lr_bicubic):
        """
        Args:
            lr (Tensor): (B, 3, H/s, W/s), the IFRM's LR (s = 16 or 32), in [-1, 1].
            lr_bicubic (Tensor): (B, 3, H/s, W/s), MATLAB-bicubic HR↓s in the same range and channel order.

        Returns:
            Tensor: scalar (or (B, 3, H/s, W/s) with reduction 'none').
        """
        return super().forward(lr, lr_bicubic)


@LOSS_REGISTRY.register()
class FeatureRecoveryLoss(_WeightedMSE):
    """MSE between the features the IFRM recovers from the LR and the original quantised features.

    Args:
        loss_weight (float): 1.0 in the reference.
        reduction (str): 'mean' (reference), 'sum' or 'none'.
    """

    def __init__(self, loss_weight=1.0, reduction='mean'):
        super().__init__(loss_weight, reduction)

    def forward(self, recovered, quantized):
        """
        Args:
            recovered (Tensor): (B, C, h, w), the IFRM reverse output ẑ before re-quantisation
                (C = embed_dim = 256, h = H/16).
            quantized (Tensor): (B, C, h, w), the codebook vectors z_q the IFRM started from.

        Returns:
            Tensor: scalar (or (B, C, h, w) with reduction 'none').
        """
        return super().forward(recovered, quantized)


def position_gram_matrix(features):
    """Position-by-position Gram matrix, normalised by the number of positions.

    G[b, p, q] = sum_c f[b, c, p] * f[b, c, q] / (h * w), with p, q running over the h*w positions.
    (Unlike the style-transfer Gram matrix this is C-independent in size: (h*w) x (h*w).)

    Args:
        features (Tensor): (B, C, h, w).

    Returns:
        Tensor: (B, h*w, h*w).
    """
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w)
    return flat.transpose(1, 2) @ flat / (h * w)


@LOSS_REGISTRY.register()
class GramLoss(nn.Module):
    """Mean squared difference of the position Gram matrices of recovered and original features.

    ``loss_weight * mean_{b,p,q} (G(recovered) - G(quantized)) ** 2`` with G from
    :func:`position_gram_matrix`, exactly the reference definition. Memory grows as (h*w)^2:
    fine for training crops (256 px -> 256 positions), not meant for full-size validation images.

    Args:
        loss_weight (float): 1.0 in the reference.
    """

    def __init__(self, loss_weight=1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, recovered, quantized):
        """
        Args:
            recovered (Tensor): (B, C, h, w), the IFRM reverse output ẑ.
            quantized (Tensor): (B, C, h, w), the original quantised features z_q.

        Returns:
            Tensor: scalar.
        """
        _check_same_shape(recovered, quantized, 'GramLoss')
        diff = position_gram_matrix(recovered) - position_gram_matrix(quantized)
        return self.loss_weight * diff.square().mean()
