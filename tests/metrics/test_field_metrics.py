"""DISTS (piq), FID and KID (torch-fidelity) as val.metrics entries: the libraries' own values,
their weight files found in the torch cache and never downloaded, and the set-level values in
the CSV of a test run. Every network here has random weights in the official file formats."""
import csv
import importlib.util
import math
import os
from os import path as osp

import cv2
import numpy as np
import piq
import pytest
import torch
import torch_fidelity
import yaml
from basicsr.metrics import calculate_metric
from basicsr.utils.registry import ARCH_REGISTRY, METRIC_REGISTRY
from skimage import data as skdata

from helpers import ROOT, forbid_downloads, write_random_metric_weights

from vqir.metrics import dists_metric, fid_metric
from vqir.metrics.dists_metric import calculate_dists, dists_weight_paths
from vqir.metrics.fid_metric import calculate_fid, calculate_kid, inception_weights_path
from vqir.test_pipeline import main as evaluation_main
from vqir.utils.checkpoint import load_state_dict, save_state_dict
from vqir.utils.hub_weights import WeightsNotFoundError

TEST_STAGE0_YML = osp.join(ROOT, 'options', 'test', 'test_stage0_vqgan_tiny.yml')


@pytest.fixture(scope='module')
def torch_home(tmp_path_factory):
    home = tmp_path_factory.mktemp('torch_home')
    write_random_metric_weights(str(home))
    return str(home)


@pytest.fixture(autouse=True)
def cache(torch_home, monkeypatch):
    """The random weights as the torch cache; no network is kept from another cache or test."""
    monkeypatch.setenv('TORCH_HOME', torch_home)
    monkeypatch.setattr(dists_metric, '_NETWORKS', {})
    monkeypatch.setattr(fid_metric, '_NETWORKS', {})


def _crops(count, size=(48, 64), noise=0, seed=0):
    """``count`` uint8 BGR crops of a bundled photo, optionally with Gaussian noise."""
    rng = np.random.default_rng(seed)
    rgb = skdata.astronaut()
    crops = []
    for i in range(count):
        crop = rgb[40 * i:40 * i + size[0], 30 * i:30 * i + size[1], ::-1].astype(np.float64)
        crops.append(np.clip(crop + rng.normal(0, noise, crop.shape), 0, 255).astype(np.uint8))
    return crops


def test_metrics_are_registered_and_set_level_where_they_must_be():
    for name, set_level in (('calculate_dists', False), ('calculate_fid', True), ('calculate_kid', True)):
        metric = METRIC_REGISTRY.get(name)
        assert getattr(metric, 'set_level', False) is set_level and callable(metric.required_weights)


def test_dists_is_piqs_own_network(monkeypatch):
    """The network assembled from the cached files gives what piq.DISTS gives with the same weights."""
    vgg_path, dists_path = dists_weight_paths()
    vgg_state, dists_state = load_state_dict(vgg_path, param_key=None), load_state_dict(dists_path, param_key=None)

    def vgg16(pretrained=False, progress=True):
        from torchvision.models import vgg16 as build
        net = build(weights=None)
        net.load_state_dict(vgg_state)
        return net

    monkeypatch.setattr(piq.perceptual, 'vgg16', vgg16)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', lambda *args, **kwargs: dists_state)
    reference = piq.DISTS(reduction='none')
    img, noisy = _crops(1)[0], _crops(1, noise=25)[0]
    to_tensor = lambda bgr: torch.from_numpy(bgr[..., ::-1].astype(np.float32) / 255.).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = float(reference(to_tensor(noisy), to_tensor(img)))
    assert calculate_dists(noisy, img, device='cpu') == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert expected > 0.001
    assert abs(calculate_dists(img, img.copy(), device='cpu')) < 1e-6


def test_dists_options_through_basicsr():
    img = _crops(1, size=(64, 64))[0]
    framed = img.copy()
    framed[:4] = 0  # only the border differs
    assert abs(calculate_dists(framed, img, crop_border=4, device='cpu')) < 1e-6
    assert calculate_dists(framed, img, device='cpu') > 1e-4
    value = calculate_metric({'img': framed, 'img2': img}, {'type': 'calculate_dists', 'crop_border': 0,
                                                            'better': 'lower', 'device': 'cpu'})
    assert value == pytest.approx(calculate_dists(framed, img, device='cpu'))
    with pytest.raises(TypeError, match='unknown option'):
        calculate_dists(img, img, net='alex')


def test_fid_and_kid_are_torch_fidelitys_over_image_folders(tmp_path):
    """The same images through torch-fidelity's own pipeline (PNG folders) give the same values."""
    outputs, targets = _crops(5, noise=30, seed=1), _crops(5)
    for folder, images in (('a', outputs), ('b', targets)):
        os.makedirs(tmp_path / folder)
        for i, bgr in enumerate(images):
            cv2.imwrite(str(tmp_path / folder / f'{i}.png'), bgr)
    expected = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / 'a'), input2=str(tmp_path / 'b'), fid=True, kid=True, kid_subset_size=5, cuda=False,
        verbose=False, feature_extractor_weights_path=inception_weights_path(), save_cpu_ram=True)
    fid, kid = calculate_fid(outputs, targets, device='cpu'), calculate_kid(outputs, targets, device='cpu')
    assert fid == pytest.approx(expected['frechet_inception_distance'], rel=1e-3)
    assert kid == pytest.approx(expected['kernel_inception_distance_mean'], rel=1e-3)
    assert fid > 0.1 and kid > 0
    assert abs(calculate_fid(targets, targets, device='cpu')) < 1e-3
    assert math.isnan(calculate_fid(targets[:1], targets[:1], device='cpu'))  # one image has no covariance


def test_missing_weights_name_file_and_folder_and_download_nothing(tmp_path, monkeypatch):
    forbid_downloads(monkeypatch, tmp_path)
    folder = str(tmp_path / 'hub' / 'checkpoints')
    img = _crops(1)[0]
    for call, file_name in ((lambda: calculate_dists(img, img, device='cpu'), 'vgg16-397923af.pth'),
                            (lambda: calculate_fid([img, img], [img, img], device='cpu'),
                             'weights-inception-2015-12-05-6726825d.pth')):
        with pytest.raises(WeightsNotFoundError) as err:
            call()
        message = str(err.value)
        assert f"'{file_name}' in folder '{folder}'" in message and 'https://' in message and '\n' not in message


def test_test_run_reports_dists_per_image_and_fid_kid_over_the_set(tmp_path, demo):
    with open(TEST_STAGE0_YML, encoding='utf-8') as f:
        net_opt = dict(yaml.safe_load(f)['network_g'])
    torch.manual_seed(0)
    weights = tmp_path / 'net_g.pth'
    save_state_dict(ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt), str(weights), param_key='params')
    metrics = ('{dists: {type: calculate_dists, output: rec, target: gt, crop_border: 16, better: lower}, '
               'fid: {type: calculate_fid, output: rec, target: gt, better: lower}, '
               'kid: {type: calculate_kid, output: rec, target: gt, better: lower}}')
    root = tmp_path / 'root'
    evaluation_main(['-opt', TEST_STAGE0_YML, '--force_yml', f'path:root={root}', f'path:pretrain_network_g={weights}',
                     f'datasets:test_1:dataroot_gt={demo}/val', f'val:metrics={metrics}'])
    results = root / 'results' / 'test_stage0_vqgan_tiny'
    with open(results / 'metrics_demo_val.csv', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    names = [r['image'] for r in rows[:-1]]
    assert rows[-1]['image'] == 'mean' and list(rows[0])[:4] == ['image', 'dists', 'fid', 'kid']
    assert all(r['dists'] and not r['fid'] and not r['kid'] for r in rows[:-1])  # per image: DISTS only
    recs = [cv2.imread(str(results / 'demo_val' / 'rec' / f'{name}.png')) for name in names]
    gts = [cv2.imread(osp.join(demo, 'val', f'{name}.png')) for name in names]
    assert float(rows[-1]['fid']) == pytest.approx(calculate_fid(recs, gts, device='cpu'), abs=1e-4)
    assert float(rows[-1]['kid']) == pytest.approx(calculate_kid(recs, gts, device='cpu'), abs=1e-4)
    assert float(rows[0]['dists']) == pytest.approx(calculate_dists(recs[0], gts[0], crop_border=16, device='cpu'),
                                                    abs=1e-4)

    # the papers' table from this run: one row, the CSV's means, DISTS / FID / KID, no PSNR measured
    table = load_script('metrics/metrics_table')
    assert table.main([str(results), '--method', 'test_stage0_vqgan_tiny=tiny', '-o', str(tmp_path / 'table')]) == 0
    with open(tmp_path / 'table.csv', encoding='utf-8') as f:
        (row, ) = list(csv.DictReader(f))
    assert (row['method'], row['test set'], row['PSNR']) == ('tiny', 'demo_val', '')
    for column in ('DISTS', 'FID', 'KID'):
        assert float(row[column]) == float(rows[-1][column.lower()])


def load_script(name):
    spec = importlib.util.spec_from_file_location(f'vqir_script_{name}', osp.join(ROOT, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_set_level_entries_share_features_and_skip_pairs_without_a_target(monkeypatch):
    """FID and KID of the same images compute each image's features once; a pair whose target is
    missing (a test set without lq, say) is left out of that entry only."""
    calls = []

    def features(img, crop, order, device):  # a constant vector: the image's mean
        calls.append(float(img.mean()))
        return torch.full((2048, ), float(img.mean()))

    monkeypatch.setattr(fid_metric, 'inception_features', features)
    sets = fid_metric.InceptionFeatureSets({
        'psnr': {'type': 'calculate_psnr', 'output': 'SR', 'target': 'gt'},
        'fid': {'type': 'calculate_fid', 'output': 'SR', 'target': 'gt'},
        'kid': {'type': 'calculate_kid', 'output': 'SR', 'target': 'gt'},
        'fid_lr': {'type': 'calculate_fid', 'output': 'LR', 'target': 'lq'},
    })
    assert list(sets.entries) == ['fid', 'kid', 'fid_lr']
    for value in (10, 20, 30):
        img = np.full((8, 8, 3), value, np.uint8)
        sets.add({'SR': img, 'gt': img + 1, 'LR': img})  # no lq
    assert len(calls) == 6  # SR and gt of three images, once for FID and KID together
    values = sets.compute()
    assert [len(sets.features[name][0]) for name in ('fid', 'kid', 'fid_lr')] == [3, 3, 0]
    assert values['fid'] == pytest.approx(2048.0, rel=1e-3)  # every feature differs by 1: |mu1 - mu2|^2
    assert math.isnan(values['fid_lr'])
