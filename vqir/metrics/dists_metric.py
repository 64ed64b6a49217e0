"""DISTS (Ding et al., 2020) as a basicsr image metric (lower is better): ``type: calculate_dists``.

The computation is piq's ``DISTS`` (the authors' method: VGG16 with L2 pooling, structure and
texture terms weighted by learned alpha / beta, inputs whose shorter side exceeds 256 pixels
resized to 256 as the authors' evaluation does). Its two weight files are read from the torch
cache, where torchvision and piq themselves would save them, and never downloaded:

- ``vgg16-397923af.pth``: torchvision's ImageNet VGG16 (the file LPIPS 'vgg' uses too);
- ``dists_weights.pt``: the alpha / beta of DISTS, as piq publishes them.

Both are loaded through :mod:`vqir.utils.checkpoint` (``weights_only=True``); a missing one stops
the run at start (or skips the metric with ``optional: true``), naming the file and the folder.
"""
import warnings

import numpy as np
import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import METRIC_REGISTRY

from vqir.metrics.metric_util import checked_color_pair
from vqir.utils.hub_weights import hub_weights_path

__all__ = ['DISTS_WEIGHTS_URL', 'build_dists', 'calculate_dists', 'dists_weight_paths']

DISTS_WEIGHTS_URL = 'https://github.com/photosynthesis-team/piq/releases/download/v0.4.1/dists_weights.pt'
# VGG16 layers whose features DISTS compares (after the image itself): relu1_2 ... relu5_3
_DISTS_LAYERS = ('relu1_2', 'relu2_2', 'relu3_3', 'relu4_3', 'relu5_3')
_DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)

_NETWORKS = {}  # device -> frozen DISTS network


def dists_weight_paths(check_exists=True):
    """(VGG16 weights, DISTS alpha / beta) paths in the torch cache.

    Raises:
        WeightsNotFoundError naming the file, the folder and the URL, when ``check_exists`` and a
        file is missing.
    """
    from torchvision.models import VGG16_Weights
    return (hub_weights_path(VGG16_Weights.IMAGENET1K_V1.url, 'DISTS (its ImageNet VGG16)', check_exists),
            hub_weights_path(DISTS_WEIGHTS_URL, 'DISTS (its alpha / beta weights)', check_exists))


def build_dists():
    """A frozen piq ``DISTS`` in eval mode on the CPU, its weights loaded from the torch cache.

    piq's constructor would download both files; here its network is assembled from a torchvision
    VGG16 built without weights, and the weights are loaded the safe way. Call the result as
    ``model(x, y)`` with (B, 3, H, W) RGB in [0, 1]; it returns (B,) distances.
    """
    import piq
    from piq.perceptual import IMAGENET_MEAN, IMAGENET_STD, VGG16_LAYERS, ContentLoss
    from torchvision.models import vgg16

    from vqir.utils.checkpoint import load_state_dict

    vgg_path, dists_path = dists_weight_paths()
    vgg_state = load_state_dict(vgg_path, param_key=None)
    features = vgg16(weights=None).features
    features.load_state_dict({k[len('features.'):]: v for k, v in vgg_state.items() if k.startswith('features.')})
    weights = load_state_dict(dists_path, param_key=None)
    expected = (1, sum(_DISTS_CHANNELS), 1, 1)
    for key in ('alpha', 'beta'):
        if key not in weights or tuple(weights[key].shape) != expected:
            raise ValueError(f"DISTS weights '{dists_path}' need '{key}' of shape {expected}, got "
                             f'{tuple(weights[key].shape) if key in weights else "no such entry"}')
    layer_weights = list(torch.split(weights['alpha'], _DISTS_CHANNELS, dim=1))
    layer_weights += list(torch.split(weights['beta'], _DISTS_CHANNELS, dim=1))

    model = piq.DISTS.__new__(piq.DISTS)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        ContentLoss.__init__(model, feature_extractor=features, layers=[VGG16_LAYERS[name] for name in _DISTS_LAYERS],
                             weights=layer_weights, replace_pooling=True, reduction='none', mean=IMAGENET_MEAN,
                             std=IMAGENET_STD, normalize_features=False, allow_layers_weights_mismatch=True)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _dists_network(device):
    key = str(device)
    if key not in _NETWORKS:
        _NETWORKS[key] = build_dists().to(device)
        get_root_logger().info(f'DISTS metric network built on {device}.')
    return _NETWORKS[key]


def _to_tensor(img, device):
    """(H, W, 3) BGR in [0, 255] -> (1, 3, H, W) RGB in [0, 1]."""
    rgb = np.ascontiguousarray(img[..., ::-1], dtype=np.float32) / 255.
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(device)


@METRIC_REGISTRY.register()
def calculate_dists(img, img2, crop_border=0, input_order='HWC', device=None, **kwargs):
    """DISTS distance between two images (basicsr metric conventions).

    Args:
        img (ndarray): (H, W, 3) BGR image with values in [0, 255] (uint8 from ``tensor2img``).
        img2 (ndarray): the reference image, same shape.
        crop_border (int): pixels removed at each edge before the comparison.
        input_order (str): 'HWC' or 'CHW'.
        device (str | torch.device | None): where DISTS runs; None picks CUDA when available.
        **kwargs: only the options basicsr passes to every metric ('better', 'test_y_channel').

    Returns:
        float: the DISTS distance, 0 for identical images.

    Raises:
        WeightsNotFoundError: when a weights file is not in the torch cache.
    """
    img, img2 = checked_color_pair('calculate_dists', img, img2, crop_border, input_order, kwargs)
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    network = _dists_network(torch.device(device))
    with torch.no_grad():
        distance = network(_to_tensor(img, device), _to_tensor(img2, device))
    return float(distance.reshape(-1)[0].item())


def _required_weights(device=None, **kwargs):
    """The weight files this metric reads (checked before a run starts)."""
    return dists_weight_paths()


calculate_dists.required_weights = _required_weights
