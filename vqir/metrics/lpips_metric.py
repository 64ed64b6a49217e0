"""LPIPS as a basicsr image metric (lower is better): ``type: calculate_lpips`` in ``val.metrics``.

Computed image by image on the RGB reconstruction, as the field reports it; the mean over a
set is taken by the caller (basicsr's validation loop). The reference computed the same values
from the image files written to disk.
"""
import numpy as np
import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import METRIC_REGISTRY

from vqir.metrics.metric_util import checked_color_pair
from vqir.utils.lpips_weights import build_lpips, lpips_backbone_path

__all__ = ['calculate_lpips']

_NETWORKS = {}  # (net, device, pretrained_backbone) -> frozen LPIPS network


def _lpips_network(net, device, pretrained_backbone):
    key = (net, str(device), pretrained_backbone)
    if key not in _NETWORKS:
        _NETWORKS[key] = build_lpips(net=net, pretrained_backbone=pretrained_backbone).to(device)
        get_root_logger().info(f'LPIPS metric network [{net}] built on {device} '
                               f'({"pretrained" if pretrained_backbone else "random"} backbone).')
    return _NETWORKS[key]


def _to_lpips_tensor(img, device):
    """(H, W, 3) BGR in [0, 255] -> (1, 3, H, W) RGB in [-1, 1]."""
    rgb = np.ascontiguousarray(img[..., ::-1], dtype=np.float32)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(device)
    return tensor / 127.5 - 1.0


@METRIC_REGISTRY.register()
def calculate_lpips(img,
                    img2,
                    crop_border=0,
                    input_order='HWC',
                    net='vgg',
                    device=None,
                    pretrained_backbone=True,
                    **kwargs):
    """LPIPS distance between two images (basicsr metric conventions).

    Args:
        img (ndarray): (H, W, 3) BGR image with values in [0, 255] (uint8 from ``tensor2img``).
        img2 (ndarray): the reference image, same shape.
        crop_border (int): pixels removed at each edge before the comparison.
        input_order (str): 'HWC' or 'CHW'.
        net (str): LPIPS backbone, 'vgg' (reference) or 'alex'.
        device (str | torch.device | None): where LPIPS runs; None picks CUDA when available.
        pretrained_backbone (bool): False uses a randomly initialised backbone (tests only).
        **kwargs: only the options basicsr passes to every metric ('better', 'test_y_channel'),
            which are ignored; anything else is an error.

    Returns:
        float: LPIPS distance (0 for identical images).

    Raises:
        LPIPSWeightsNotFoundError: when the backbone weights are not in the torch cache.
    """
    img, img2 = checked_color_pair('calculate_lpips', img, img2, crop_border, input_order, kwargs)

    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    network = _lpips_network(net, torch.device(device), pretrained_backbone)
    with torch.no_grad():
        distance = network(_to_lpips_tensor(img, device), _to_lpips_tensor(img2, device))
    return float(distance.item())


def _required_weights(net='vgg', pretrained_backbone=True, **kwargs):
    """The weight files this metric reads (checked before a run starts)."""
    return [lpips_backbone_path(net)] if pretrained_backbone else []


calculate_lpips.required_weights = _required_weights
