"""FID and KID over a whole test set (lower is better): ``type: calculate_fid`` / ``calculate_kid``.

Both compare the distribution of the outputs with that of the targets in the 2048-d pool features
of the TensorFlow-compatible Inception-V3 that papers use, through torch-fidelity (its feature
extractor, its FID and its KID). Each image, whatever its size, is resized to 299x299 by that
extractor, as torch-fidelity does for image folders. They are set-level metrics: in ``val.metrics``
the validation loop gathers one feature vector per output and target image and computes the value
once at the end (the CSV's mean row, the table, TensorBoard), so a set of 2K images never sits in
memory. KID is the mean over 100 random subsets of min(1000, N) images (torch-fidelity's defaults,
seed 2020); ``subsets`` and ``subset_size`` change that. Both need at least two images.

The Inception weights (``weights-inception-2015-12-05-6726825d.pth``, torch-fidelity's release) are
read from the torch cache and never downloaded; a missing file stops the run at start (or skips the
metric with ``optional: true``), naming the file and the folder. The file is first read with
``weights_only=True`` (a checkpoint is untrusted input) before torch-fidelity loads it.
"""
import math
from collections import OrderedDict

import numpy as np
import torch
from basicsr.metrics.metric_util import reorder_image
from basicsr.utils import get_root_logger
from basicsr.utils.registry import METRIC_REGISTRY
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

from vqir.metrics.metric_util import check_shared_options
from vqir.utils.checkpoint import load_state_dict
from vqir.utils.hub_weights import hub_weights_path

__all__ = [
    'INCEPTION_URL', 'InceptionFeatureSets', 'calculate_fid', 'calculate_kid', 'fid_from_features',
    'inception_features', 'inception_weights_path', 'is_set_level', 'kid_from_features'
]

INCEPTION_URL = URL_INCEPTION_V3  # .../weights-inception-2015-12-05-6726825d.pth
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's defaults

_NETWORKS = {}  # device -> Inception feature extractor


def inception_weights_path(check_exists=True):
    """The Inception-V3 weights in the torch cache (raises WeightsNotFoundError when absent)."""
    return hub_weights_path(INCEPTION_URL, 'FID / KID (the Inception-V3 of torch-fidelity)', check_exists)


def _inception(device):
    key = str(device)
    if key not in _NETWORKS:
        path = inception_weights_path()
        load_state_dict(path, param_key=None)  # refuses a file that would run code; torch-fidelity's load does not
        _NETWORKS[key] = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'],
                                                     feature_extractor_weights_path=path).to(device)
        get_root_logger().info(f'Inception-V3 (FID / KID) built on {device}.')
    return _NETWORKS[key]


def inception_features(img, crop_border=0, input_order='HWC', device=None):
    """The 2048-d Inception pool features of one image.

    Args:
        img (ndarray): (H, W, 3) BGR image with values in [0, 255] (uint8 from ``tensor2img``).
        crop_border (int): pixels removed at each edge first.
        input_order (str): 'HWC' or 'CHW'.
        device: where the network runs; None picks CUDA when available.

    Returns:
        Tensor: (2048,) float32 on the CPU.
    """
    img = reorder_image(img, input_order=input_order)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'FID / KID need 3-channel images, got shape {img.shape} (HWC).')
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    rgb = np.ascontiguousarray(np.clip(np.round(img[..., ::-1]), 0, 255).astype(np.uint8))
    batch = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(device)
    with torch.no_grad():
        (features, ) = _inception(torch.device(device))(batch)
    return features[0].float().cpu()


def fid_from_features(features, features2):
    """FID between two sets of features, (N, D) and (M, D); NaN for fewer than two of either."""
    if len(features) < 2 or len(features2) < 2:
        return math.nan
    stats = [fid_features_to_statistics(torch.as_tensor(f, dtype=torch.float32)) for f in (features, features2)]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID])


def kid_from_features(features, features2, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE):
    """KID (mean over random subsets of min(subset_size, N, M) images); NaN for fewer than two."""
    size = min(subset_size, len(features), len(features2))
    if size < 2:
        return math.nan
    result = kid_features_to_metric(torch.as_tensor(features, dtype=torch.float32),
                                    torch.as_tensor(features2, dtype=torch.float32), kid_subsets=subsets,
                                    kid_subset_size=size, rng_seed=KID_SEED, verbose=False)
    return float(result[KEY_METRIC_KID_MEAN])


def _feature_sets(imgs, imgs2, crop_border, input_order, device):
    if len(imgs) != len(imgs2):
        raise ValueError(f'FID / KID compare sets of equal size, got {len(imgs)} and {len(imgs2)} images')
    return [torch.stack([inception_features(i, crop_border, input_order, device) for i in images])
            for images in (imgs, imgs2)]


@METRIC_REGISTRY.register()
def calculate_fid(img, img2, crop_border=0, input_order='HWC', device=None, **kwargs):
    """FID between the set of outputs ``img`` and the set of targets ``img2``.

    Args:
        img, img2 (sequence of ndarray): the images of the two sets, each (H, W, 3) BGR in [0, 255].
        crop_border, input_order, device: as :func:`inception_features`.
        **kwargs: only the options basicsr passes to every metric ('better', 'test_y_channel').
    """
    check_shared_options('calculate_fid', kwargs)
    return fid_from_features(*_feature_sets(img, img2, crop_border, input_order, device))


@METRIC_REGISTRY.register()
def calculate_kid(img, img2, crop_border=0, input_order='HWC', device=None, subsets=KID_SUBSETS,
                  subset_size=KID_SUBSET_SIZE, **kwargs):
    """KID between the set of outputs ``img`` and the set of targets ``img2`` (as :func:`calculate_fid`)."""
    check_shared_options('calculate_kid', kwargs)
    return kid_from_features(*_feature_sets(img, img2, crop_border, input_order, device), subsets, subset_size)


def _required_weights(**kwargs):
    return [inception_weights_path()]


def is_set_level(metric_type):
    """True for metrics computed once over a whole set (FID, KID), not image by image."""
    return getattr(METRIC_REGISTRY.get(metric_type), 'set_level', False)


for _metric in (calculate_fid, calculate_kid):
    _metric.set_level = True  # computed once over a whole set, not image by image
    _metric.required_weights = _required_weights


class InceptionFeatureSets:
    """The set-level entries of ``val.metrics`` (FID, KID), fed one image pair at a time.

    Entries that read the same output, target and border share one feature pass. Example::

        sets = InceptionFeatureSets(metric_opts)         # {name: options} of val.metrics, all kinds
        for each image: sets.add(images)                 # {image name: (H, W, 3) BGR uint8}
        values = sets.compute()                          # {metric name: value}
    """

    def __init__(self, metric_opts):
        self.entries = OrderedDict((name, opt) for name, opt in metric_opts.items() if is_set_level(opt['type']))
        self.features = {name: ([], []) for name in self.entries}  # name -> (output features, target features)

    def add(self, images):
        """Add one image pair to every entry whose output and target are both in ``images``
        ({name: image}); the features of an image are computed once for all entries."""
        computed = {}
        for name, opt in self.entries.items():
            crop, order = opt.get('crop_border', 0), opt.get('input_order', 'HWC')
            if opt['output'] not in images or opt['target'] not in images:
                continue  # as for the per-image metrics: a pair without its target is left out
            for side, image_name in enumerate((opt['output'], opt['target'])):
                key = (image_name, crop, order)
                if key not in computed:
                    computed[key] = inception_features(images[image_name], crop, order, opt.get('device'))
                self.features[name][side].append(computed[key])

    def compute(self):
        """{metric name: value} over everything added (NaN with fewer than two pairs)."""
        values = OrderedDict()
        for name, opt in self.entries.items():
            sets = [torch.stack(f) if f else torch.zeros(0, 2048) for f in self.features[name]]
            if opt['type'] == 'calculate_fid':
                values[name] = fid_from_features(*sets)
            else:
                values[name] = kid_from_features(*sets, opt.get('subsets', KID_SUBSETS),
                                                 opt.get('subset_size', KID_SUBSET_SIZE))
        return values
