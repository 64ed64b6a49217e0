"""Weight files that live in the torch cache, found there and never downloaded.

Metric networks (LPIPS and DISTS backbones, the FID/KID Inception) keep their weights where
torchvision and ``torch.hub`` save downloads: ``torch.hub.get_dir()/checkpoints``
(``$TORCH_HOME/hub/checkpoints``), under the file name of the download URL. A run looks there
and nowhere else; a missing file is one clear error naming the file, the folder and the URL to
fetch it from on a machine with internet access.
"""
import os
from urllib.parse import urlparse

import torch

from .errors import InputError

__all__ = ['WeightsNotFoundError', 'hub_checkpoints_dir', 'hub_weights_path']


class WeightsNotFoundError(InputError, FileNotFoundError):
    """A weights file is not where it must be (nothing is ever downloaded)."""


def hub_checkpoints_dir():
    """``torch.hub.get_dir()/checkpoints``, read at call time (so ``TORCH_HOME`` set later counts)."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def hub_weights_path(url, what, check_exists=True, error=WeightsNotFoundError):
    """Path of the weights downloaded from ``url`` in the torch cache.

    Args:
        url (str): the official download URL; its last path part is the file name.
        what (str): what needs the file, for the message (e.g. "DISTS").
        check_exists (bool): raise ``error`` when the file is absent.
        error (type): the :class:`WeightsNotFoundError` subclass to raise.

    Returns:
        str: the absolute path.
    """
    file_name = os.path.basename(urlparse(url).path)
    folder = hub_checkpoints_dir()
    path = os.path.join(folder, file_name)
    if check_exists and not os.path.isfile(path):
        raise error(f"{what} needs the weights file '{file_name}' in folder '{folder}' "
                    f'(torch.hub.get_dir()/checkpoints; set TORCH_HOME to use another cache), and it is not there. '
                    f'Nothing is downloaded: fetch {url} on a machine with internet access and copy it into that folder.')
    return path
