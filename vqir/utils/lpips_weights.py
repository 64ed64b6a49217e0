"""Building an LPIPS network (Zhang et al., 2018) from local files only.

LPIPS has two sets of weights:

- the linear calibration layers ("lin" 1x1 convs), shipped inside the ``lpips`` package
  (``lpips/weights/v0.1/{vgg,alex}.pth``);
- the ImageNet backbone (torchvision VGG16 or AlexNet), which torchvision keeps in the torch
  cache ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``) under the file name
  of its weights enum, e.g. ``vgg16-397923af.pth``.

Nothing here downloads: the ``lpips`` and torchvision constructors are always called with random
initialisation, and the weights are then loaded from those files through :mod:`vqir.utils.checkpoint`
(``weights_only=True``). A missing backbone file raises :class:`LPIPSWeightsNotFoundError`, naming
the file, the folder and the URL to fetch it from on a machine with internet access.
"""
import os
import warnings

import torch

from .hub_weights import WeightsNotFoundError, hub_weights_path

__all__ = [
    'LPIPSWeightsNotFoundError', 'SUPPORTED_LPIPS_NETS', 'build_lpips', 'lpips_available', 'lpips_backbone_path',
    'lpips_backbone_url', 'lpips_linear_weights_path'
]

SUPPORTED_LPIPS_NETS = ('vgg', 'alex')


class LPIPSWeightsNotFoundError(WeightsNotFoundError):
    """An LPIPS weights file is not where it must be (nothing is ever downloaded)."""


def _check_net(net):
    if net not in SUPPORTED_LPIPS_NETS:
        raise ValueError(f'LPIPS net must be one of {SUPPORTED_LPIPS_NETS}, got {net!r}.')


def _backbone_weights(net):
    """The torchvision weights enum entry that LPIPS v0.1 was calibrated on."""
    from torchvision import models

    _check_net(net)
    return {'vgg': models.VGG16_Weights.IMAGENET1K_V1, 'alex': models.AlexNet_Weights.IMAGENET1K_V1}[net]


def lpips_backbone_url(net):
    """Official download URL of the torchvision backbone weights for ``net`` ('vgg' or 'alex')."""
    return _backbone_weights(net).url


def lpips_backbone_path(net, check_exists=True):
    """Path of the backbone weights file in the torch cache, e.g. ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``.

    The file name is the one torchvision itself would save the download under. ``TORCH_HOME``
    is read at call time (through ``torch.hub.get_dir()``).

    Args:
        net (str): 'vgg' or 'alex'.
        check_exists (bool): raise :class:`LPIPSWeightsNotFoundError` when the file is absent.

    Returns:
        str: the absolute path.
    """
    return hub_weights_path(lpips_backbone_url(net), f"LPIPS '{net}' (its ImageNet backbone)", check_exists,
                            error=LPIPSWeightsNotFoundError)


def lpips_linear_weights_path(net):
    """Path of the LPIPS v0.1 linear-layer weights shipped with the ``lpips`` package."""
    import lpips

    _check_net(net)
    return os.path.join(os.path.dirname(os.path.abspath(lpips.__file__)), 'weights', 'v0.1', f'{net}.pth')


def lpips_available(net='vgg'):
    """True when both weight files for ``net`` are on disk, so ``build_lpips(net)`` will succeed."""
    return os.path.isfile(lpips_backbone_path(net, check_exists=False)) and os.path.isfile(
        lpips_linear_weights_path(net))


def _load_state_dict(path):
    # Through the project's checkpoint reader: weights_only=True, CPU tensors, clear errors for bad files.
    from vqir.utils.checkpoint import load_state_dict

    return load_state_dict(path, param_key=None)


def _load_linear_layers(model, net):
    """Copy the ``lin{k}.model.1.weight`` entries (stored with a Dropout at index 0) into ``model.lins``."""
    path = lpips_linear_weights_path(net)
    if not os.path.isfile(path):
        raise LPIPSWeightsNotFoundError(
            f"LPIPS linear-layer weights '{path}' are missing: reinstall the lpips package.")
    state = _load_state_dict(path)
    expected = {f'lin{k}.model.1.weight' for k in range(len(model.lins))}
    if set(state) != expected:
        raise KeyError(f"LPIPS linear weights '{path}' hold keys {sorted(state)}, expected {sorted(expected)}.")
    for k, lin in enumerate(model.lins):
        # Built without dropout, the 1x1 conv sits at index 0 of lin.model.
        lin.model[0].weight.data.copy_(state[f'lin{k}.model.1.weight'])


def _load_backbone(model, net):
    """Copy torchvision's ``features.{i}.*`` tensors into the LPIPS slices ``slice{s}.{i}.*``."""
    path = lpips_backbone_path(net, check_exists=True)
    state = _load_state_dict(path)
    own = model.net.state_dict()
    for name, tensor in own.items():
        _, index, param = name.split('.')  # 'slice3.10.weight': the index is torchvision's
        source = f'features.{index}.{param}'
        if source not in state:
            raise KeyError(f"Backbone weights '{path}' have no key '{source}' (needed for LPIPS '{net}').")
        if state[source].shape != tensor.shape:
            raise ValueError(f"Backbone weights '{path}': '{source}' has shape {tuple(state[source].shape)}, "
                             f'LPIPS expects {tuple(tensor.shape)}.')
        tensor.copy_(state[source])


def build_lpips(net='vgg', pretrained_backbone=True):
    """Build a frozen LPIPS v0.1 network in eval mode, on the CPU.

    Args:
        net (str): backbone, 'vgg' (VGG16) or 'alex' (AlexNet).
        pretrained_backbone (bool): load the ImageNet backbone from the torch cache (see
            :func:`lpips_backbone_path`). False leaves it randomly initialised: the code path of a
            real LPIPS without its values, for tests. The linear layers are always loaded.

    Returns:
        lpips.LPIPS: call as ``model(x, y)`` with x, y of shape (B, 3, H, W) in [-1, 1], RGB;
        returns (B, 1, 1, 1). All parameters have ``requires_grad=False``.

    Raises:
        LPIPSWeightsNotFoundError: when ``pretrained_backbone`` and the backbone file is missing.
    """
    import lpips

    _check_net(net)
    if pretrained_backbone:
        lpips_backbone_path(net, check_exists=True)  # fail before spending time on construction

    with warnings.catch_warnings():
        # lpips passes torchvision's deprecated `pretrained=False`; harmless, and nothing is fetched.
        warnings.filterwarnings('ignore', message='.*pretrained.*', category=UserWarning)
        warnings.filterwarnings('ignore', message='.*weight enum.*', category=UserWarning)
        # pretrained=False / pnet_rand=True: neither lpips nor torchvision loads or downloads anything.
        model = lpips.LPIPS(
            pretrained=False, net=net, version='0.1', pnet_rand=True, use_dropout=False, verbose=False)

    with torch.no_grad():
        _load_linear_layers(model, net)
        if pretrained_backbone:
            _load_backbone(model, net)

    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
