"""LPIPS metric and weight handling, codebook usage statistics."""
import math
import os

import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_metric
from basicsr.utils.registry import METRIC_REGISTRY
from skimage import data as skdata
from torchvision import models as tv_models

from vqir.metrics import lpips_metric
from vqir.metrics.codebook_metric import CodebookUsageAccumulator, codebook_usage, usage_from_counts
from vqir.metrics.lpips_metric import calculate_lpips
from vqir.utils.checkpoint import load_state_dict
from vqir.utils.lpips_weights import (LPIPSWeightsNotFoundError, build_lpips, lpips_available, lpips_backbone_path,
                                      lpips_linear_weights_path)

from helpers import forbid_downloads

RANDOM_ALEX = dict(net='alex', pretrained_backbone=False, device='cpu')


@pytest.fixture(scope='module')
def bgr_pair():
    """Two 64x64 uint8 BGR crops of a bundled photo: the original and a noisy copy."""
    rgb = skdata.astronaut()[100:164, 180:244]
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    noise = np.random.default_rng(0).normal(0, 20, bgr.shape)
    noisy = np.clip(bgr + noise, 0, 255).astype(np.uint8)
    return bgr, noisy


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the random LPIPS backbone of a metric network built inside a test


# ----------------------------------------------------------------------------- weights lookup

def test_backbone_file_names_come_from_torchvision(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    folder = tmp_path / 'hub' / 'checkpoints'
    vgg_name = os.path.basename(tv_models.VGG16_Weights.IMAGENET1K_V1.url)
    alex_name = os.path.basename(tv_models.AlexNet_Weights.IMAGENET1K_V1.url)
    assert (vgg_name, alex_name) == ('vgg16-397923af.pth', 'alexnet-owt-7be5be79.pth')
    assert lpips_backbone_path('vgg', check_exists=False) == str(folder / vgg_name)
    assert lpips_backbone_path('alex', check_exists=False) == str(folder / alex_name)
    assert os.path.isfile(lpips_linear_weights_path('vgg'))
    with pytest.raises(ValueError, match='squeeze'):
        lpips_backbone_path('squeeze')


def test_missing_backbone_raises_without_download(tmp_path, monkeypatch):
    forbid_downloads(monkeypatch, tmp_path)
    assert not lpips_available('vgg') and not lpips_available('alex')
    for net, file_name in (('vgg', 'vgg16-397923af.pth'), ('alex', 'alexnet-owt-7be5be79.pth')):
        with pytest.raises(LPIPSWeightsNotFoundError) as err:
            build_lpips(net)
        message = str(err.value)
        assert file_name in message and str(tmp_path / 'hub' / 'checkpoints') in message
        assert 'https://download.pytorch.org/models/' + file_name in message
    build_lpips('alex', pretrained_backbone=False)  # the random path never downloads either


def _write_fake_alexnet(tmp_path, monkeypatch, drop_key=None):
    """A torchvision-layout AlexNet state_dict (features only, random values) in an empty torch cache."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    state = {k: v for k, v in tv_models.alexnet(weights=None).state_dict().items() if k.startswith('features.')}
    if drop_key:
        del state[drop_key]
    path = lpips_backbone_path('alex', check_exists=False)
    os.makedirs(os.path.dirname(path))
    torch.save(state, path)
    return state


def test_build_lpips_loads_backbone_and_linear_weights(tmp_path, monkeypatch):
    state = _write_fake_alexnet(tmp_path, monkeypatch)
    assert lpips_available('alex')
    model = build_lpips('alex')
    assert torch.equal(getattr(model.net.slice1, '0').weight, state['features.0.weight'])
    assert torch.equal(getattr(model.net.slice5, '10').bias, state['features.10.bias'])  # named by torchvision index
    linear = load_state_dict(lpips_linear_weights_path('alex'), param_key=None)
    for k in range(5):
        assert torch.equal(model.lins[k].model[0].weight, linear[f'lin{k}.model.1.weight'])
    assert not model.training and all(not p.requires_grad for p in model.parameters())


def test_build_lpips_names_a_missing_key(tmp_path, monkeypatch):
    _write_fake_alexnet(tmp_path, monkeypatch, drop_key='features.3.weight')
    with pytest.raises(KeyError, match='features.3.weight'):
        build_lpips('alex')


# ----------------------------------------------------------------------------- LPIPS metric

def test_lpips_metric_is_registered():
    assert METRIC_REGISTRY.get('calculate_lpips') is calculate_lpips


def test_lpips_metric_zero_for_identical_positive_otherwise(bgr_pair):
    img, noisy = bgr_pair
    assert calculate_lpips(img, img.copy(), **RANDOM_ALEX) == 0.0
    assert calculate_lpips(noisy, img, **RANDOM_ALEX) > 0


def test_lpips_metric_flips_bgr_and_scales_to_unit_range(bgr_pair):
    img, noisy = bgr_pair
    network = lpips_metric._lpips_network('alex', torch.device('cpu'), False)

    def as_tensor(bgr):
        rgb = torch.from_numpy(bgr[..., ::-1].astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        return rgb * 2 - 1

    expected = network(as_tensor(noisy), as_tensor(img)).item()
    assert calculate_lpips(noisy, img, **RANDOM_ALEX) == pytest.approx(expected, rel=1e-5)
    chw = calculate_lpips(noisy.transpose(2, 0, 1), img.transpose(2, 0, 1), input_order='CHW', **RANDOM_ALEX)
    assert chw == pytest.approx(expected, rel=1e-5)
    # the network is built once per (net, device, backbone) and reused
    assert lpips_metric._lpips_network('alex', torch.device('cpu'), False) is network


def test_lpips_metric_crop_border(bgr_pair):
    img, _ = bgr_pair
    framed = img.copy()
    framed[:4] = 0
    framed[-4:] = 255
    framed[:, :4] = 0
    framed[:, -4:] = 255
    assert calculate_lpips(framed, img, crop_border=4, **RANDOM_ALEX) == 0.0
    assert calculate_lpips(framed, img, crop_border=0, **RANDOM_ALEX) > 0


def test_lpips_metric_through_basicsr_options(bgr_pair):
    img, noisy = bgr_pair
    opt = {'type': 'calculate_lpips', 'crop_border': 0, 'better': 'lower', **RANDOM_ALEX}
    value = calculate_metric({'img': noisy, 'img2': img}, opt)
    assert value == pytest.approx(calculate_lpips(noisy, img, **RANDOM_ALEX))
    with pytest.raises(TypeError, match='nett'):
        calculate_metric({'img': noisy, 'img2': img}, {**opt, 'nett': 'vgg'})
    with pytest.raises(ValueError, match='shape'):
        calculate_lpips(img, img[:32], **RANDOM_ALEX)


def test_lpips_metric_missing_weights_error(bgr_pair, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    img, _ = bgr_pair
    with pytest.raises(LPIPSWeightsNotFoundError) as err:
        calculate_lpips(img, img, net='vgg', device='cpu')
    assert 'vgg16-397923af.pth' in str(err.value) and str(tmp_path / 'hub' / 'checkpoints') in str(err.value)


# ----------------------------------------------------------------------------- codebook usage

def test_uniform_usage_perplexity_equals_codes_used():
    indices = torch.arange(5).repeat(7).reshape(5, 7)  # codes 0..4, 7 times each, of 16
    usage = codebook_usage(indices, n_embed=16)
    assert usage['perplexity'] == pytest.approx(5.0, rel=1e-12)
    assert usage['used_fraction'] == 5 / 16


def test_usage_hand_computed_non_uniform():
    usage = codebook_usage(np.array([3, 3, 3, 1]), n_embed=4)  # frequencies 3/4 and 1/4
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert usage['perplexity'] == pytest.approx(math.exp(entropy), rel=1e-12)
    assert usage['used_fraction'] == 0.5
    assert codebook_usage(torch.full((4, 4), 2), n_embed=8)['perplexity'] == pytest.approx(1.0)
    assert usage_from_counts(torch.zeros(8)) == {'perplexity': 0.0, 'used_fraction': 0.0}


def test_usage_accumulator_over_batches():
    rng = np.random.default_rng(3)
    batches = [torch.from_numpy(rng.integers(0, 10, size=(2, 4, 4))) for _ in range(3)]
    acc = CodebookUsageAccumulator(n_embed=32)
    for batch in batches:
        acc.update(batch)
    assert int(acc.counts.sum()) == 3 * 2 * 4 * 4
    assert acc.result() == pytest.approx(codebook_usage(torch.cat(batches), n_embed=32))
    acc.reset()
    assert acc.result() == {'perplexity': 0.0, 'used_fraction': 0.0}


def test_usage_rejects_bad_indices():
    with pytest.raises(ValueError, match=r'\[0, 7\]'):
        codebook_usage(torch.tensor([0, 8]), n_embed=8)
    with pytest.raises(TypeError, match='integers'):
        codebook_usage(torch.tensor([0.0, 1.0]), n_embed=8)


def test_ciede2000_metric_matches_published_pairs_and_crops():
    """Sharma, Wu and Dalal's CIEDE2000 test data (pairs 1 and 17): Lab colours with their published ΔE00,
    here as 8-bit sRGB pixels, so the metric is checked against skimage's Lab of the same pixels."""
    from skimage.color import deltaE_ciede2000, lab2rgb, rgb2lab

    from vqir.metrics.ciede2000_metric import calculate_ciede2000
    assert 'calculate_ciede2000' in METRIC_REGISTRY
    lab_pairs = np.array([[[50.0, 2.6772, -79.7751], [50.0, 0.0, -82.7485]], [[50.0, 2.5, 0.0], [73.0, 25.0, -18.0]]])
    published = [2.0425, 27.1492]
    np.testing.assert_allclose(deltaE_ciede2000(lab_pairs[:, 0], lab_pairs[:, 1]), published, atol=1e-4)
    rgb = np.round(np.clip(lab2rgb(lab_pairs.transpose(1, 0, 2)), 0, 1) * 255)  # (2 images, 2 pixels, 3)
    img, ref = (np.repeat(rgb[i][:, None], 3, axis=1)[..., ::-1].astype(np.uint8) for i in (0, 1))  # BGR, 2x3
    expected = deltaE_ciede2000(rgb2lab(img[..., ::-1] / 255.0), rgb2lab(ref[..., ::-1] / 255.0)).mean()
    assert calculate_ciede2000(img, ref) == pytest.approx(expected)
    assert 10 < calculate_ciede2000(img, ref) < 20  # 8-bit sRGB rounding keeps the two pairs' mean near 14.6
    assert calculate_ciede2000(img, img) == 0
    photo = skdata.astronaut()[:40, :40, ::-1].copy()
    framed = photo.copy()
    framed[:4], framed[-4:], framed[:, :4], framed[:, -4:] = 0, 0, 0, 0
    assert calculate_ciede2000(framed, photo, crop_border=4) == 0 < calculate_ciede2000(framed, photo)
    value = calculate_metric(dict(img=framed, img2=photo), {'type': 'calculate_ciede2000', 'crop_border': 0,
                                                            'better': 'lower'})
    assert value == pytest.approx(calculate_ciede2000(framed, photo))
