"""What several test files share: scikit-image photos (as tensors and as folders of PNGs), a tiny
VQIR, fixed batches, a few training steps with their logs, parameter snapshots and the CSVs that
training and testing write."""
import csv
import logging
import os
from contextlib import contextmanager

import cv2
import torch
import torch.nn.functional as F
from basicsr.data import build_dataset
from basicsr.utils.registry import ARCH_REGISTRY
from skimage import data as skdata
from torch.utils.data import default_collate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')
# (name, (height, width)): sides that are not all multiples of 16 (padding), LR sides >= 11 (SSIM window)
VAL_PHOTOS = (('astronaut', (184, 200)), ('coffee', (176, 216)))
# a VQIR with every part of the released one, small enough for tests
TINY_VQIR = dict(in_channels=3, out_channels=3, ch=64, ch_mult=[1, 1, 1, 1, 1], double_z=False, num_res_blocks=1,
                 z_channels=64, n_embed=64, embed_dim=64)


@contextmanager
def basicsr_log_records():
    """The records basicsr's logger (which does not propagate to the root) receives inside the block."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger('basicsr')
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def tiny_vqir(stage=2, ir_scale=16, seed=0):
    """The tiny VQIR with random weights (seeded), in eval mode."""
    torch.manual_seed(seed)
    extra = {'attn_mult': [1, 1]} if stage == 2 else {}
    return ARCH_REGISTRY.get('VQIR')(stage=stage, ir_scale=ir_scale, **TINY_VQIR, **extra).eval()


def photo(height, width):
    """A natural RGB image (the astronaut photo, area-resized) as (1, 3, H, W) in [0, 1]."""
    img = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1)[None].float() / 255.
    return F.interpolate(img, size=(height, width), mode='area')


def on_8bit_grid(img):
    return torch.equal(img * 255., torch.round(img * 255.))


def write_photos(folder, photos):
    """Resized scikit-image photos as PNGs: ``photos`` is [(name, (height, width))]."""
    os.makedirs(folder, exist_ok=True)
    for name, (height, width) in photos:
        rgb = cv2.resize(getattr(skdata, name)(), (width, height), interpolation=cv2.INTER_AREA)
        cv2.imwrite(os.path.join(folder, f'{name}.png'), rgb[..., ::-1])
    return folder


def photo_folders(base):
    """(train, val) folders under ``base``: the training photos at 96x96, the validation photos."""
    train = write_photos(os.path.join(base, 'train'), [(name, (96, 96)) for name in TRAIN_PHOTOS])
    return train, write_photos(os.path.join(base, 'val'), VAL_PHOTOS)


def fixed_batch(opt, size=2):
    """The first ``size`` samples of the options' training set, collated."""
    dataset = build_dataset(opt['datasets']['train'])
    return default_collate([dataset[i] for i in range(size)])


def train_steps(model, batch, iterations, first=1):
    """Run ``optimize_parameters`` on one batch for ``iterations`` iterations numbered from ``first``;
    the logs of each step."""
    logs = []
    for it in range(first, first + iterations):
        model.feed_data(batch)
        model.optimize_parameters(it)
        logs.append(dict(model.log_dict))
    return logs


def snapshot(net, parts=None):
    """Copies of the parameters (of the top-level ``parts`` only, if given)."""
    return {k: v.detach().clone() for k, v in net.named_parameters() if parts is None or k.split('.')[0] in parts}


def changed(before, net):
    """Names of the parameters of ``net`` that differ from the ``snapshot`` ``before``."""
    now = dict(net.named_parameters())
    return [k for k, v in before.items() if not torch.equal(v, now[k])]


def read_csv(path):
    with open(path, newline='', encoding='utf-8') as f:
        return list(csv.DictReader(f))


def write_random_metric_weights(torch_home, seed=0):
    """Random-valued weight files of the field's metric networks, in the official formats and under
    the official names, in ``torch_home``/hub/checkpoints: torchvision's VGG16 (LPIPS 'vgg', DISTS),
    DISTS' alpha / beta (summing to 1, as the published ones do) and torch-fidelity's Inception-V3
    (He-initialised convolutions, so that different images give different features)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as inception
    from torchvision import models as tv_models

    folder = os.path.join(torch_home, 'hub', 'checkpoints')
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(tv_models.vgg16(weights=None).state_dict(), os.path.join(folder, 'vgg16-397923af.pth'))
    weights = torch.rand(2, 1, 1475, 1, 1)
    weights /= weights.sum()
    torch.save({'alpha': weights[0], 'beta': weights[1]}, os.path.join(folder, 'dists_weights.pt'))
    # torch-fidelity's constructor always loads weights: build it without, to get its layout
    with mock.patch.object(inception, 'load_state_dict_from_url', lambda *args, **kwargs: {}), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, state: None):
        net = inception.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    torch.save(net.state_dict(), os.path.join(folder, os.path.basename(inception.URL_INCEPTION_V3)))
    return folder
