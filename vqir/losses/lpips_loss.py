"""LPIPS perceptual loss (stage 2 on Level_1, reference weight 1.0; also inside VQGANLoss).

The network comes from :func:`vqir.utils.lpips_weights.build_lpips`: frozen, always in eval
mode, loaded from local files only (a missing backbone file raises an error that names it).
"""
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from vqir.utils.lpips_weights import build_lpips, lpips_backbone_path

__all__ = ['LPIPSLoss']

_INPUT_RANGES = ((-1, 1), (0, 1))


@LOSS_REGISTRY.register()
class LPIPSLoss(nn.Module):
    """loss_weight * mean over the batch of LPIPS(pred, target).

    Gradients flow to ``pred`` (and ``target`` if it requires them); the LPIPS parameters are
    frozen and never receive gradients.

    Args:
        loss_weight (float): 1.0 in the reference.
        net (str): LPIPS backbone, 'vgg' (reference) or 'alex'.
        input_range (list[float]): [-1, 1] (the networks' range, default) or [0, 1].
        pretrained_backbone (bool): False builds the backbone randomly initialised (tests only).
    """

    @staticmethod
    def required_weights(loss_weight=1.0, net='vgg', pretrained_backbone=True, **kwargs):
        """The weight files a loss with these options reads (checked before a run starts)."""
        return [lpips_backbone_path(net)] if loss_weight and pretrained_backbone else []

    def __init__(self, loss_weight=1.0, net='vgg', input_range=(-1, 1), pretrained_backbone=True):
        super().__init__()
        input_range = tuple(input_range)
        if input_range not in _INPUT_RANGES:
            raise ValueError(f'LPIPSLoss: input_range must be [-1, 1] or [0, 1], got {list(input_range)}.')
        self.loss_weight = loss_weight
        self.net_type = net
        self.inputs_in_unit_range = input_range == (0, 1)
        self.lpips = build_lpips(net=net, pretrained_backbone=pretrained_backbone)

    def train(self, mode=True):
        """The LPIPS network stays in eval mode whatever the owning model does."""
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, pred, target):
        """
        Args:
            pred (Tensor): (B, 3, H, W), RGB, in ``input_range``.
            target (Tensor): (B, 3, H, W), RGB, in ``input_range``.

        Returns:
            Tensor: scalar.
        """
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(f'LPIPSLoss expects two (B, 3, H, W) tensors, got {tuple(pred.shape)} and '
                             f'{tuple(target.shape)}.')
        # normalize=True maps [0, 1] inputs to the [-1, 1] that LPIPS expects.
        distance = self.lpips(pred, target, normalize=self.inputs_in_unit_range)  # (B, 1, 1, 1)
        return self.loss_weight * distance.mean()
