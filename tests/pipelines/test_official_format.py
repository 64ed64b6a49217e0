"""Checkpoints in the reference's format (a plain state_dict ``.pth``, as the released VQIR models)
load strictly, and the test pipeline then writes the images that the reference's conventions
give: same LR, same reconstructions (within one grey level), and an LR PNG that reads back as
the very LR tensor the network made. (The shipped option files: tests/options/test_option_files.py.)"""
import math
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network
from skimage import data as skdata
from torch import nn

from vqir.test_pipeline import test_pipeline as run_test_pipeline

from helpers import ROOT

IR_SCALE = 16
# sizes that are not multiples of 16: the reference's test sets crop them (bottom rows, right columns)
PHOTOS = (('astronaut', (72, 104)), ('coffee', (100, 90)))


def tiny_network_options(stage):
    with open(os.path.join(ROOT, 'options', 'train', 'stage2_msrm_tiny.yml'), encoding='utf-8') as f:
        net_opt = yaml.safe_load(f)['network_g']
    net_opt['stage'] = stage
    if stage == 1:
        del net_opt['attn_mult']
    return net_opt


def spread_weights_(net, seed, gain=0.5, code_std=0.1):
    """Weights under which a random network gives varied images: conv/linear weights
    N(0, gain^2 / fan_in), a codebook on the encoder's output scale (many codes in use). The IFRM
    keeps its own initialisation (it is deep and explodes with larger weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in net.named_modules():
            if name.startswith('icrm'):
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * gain / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.02)
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * code_std)


@pytest.fixture(scope='module')
def photo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('official_photos')
    for name, (height, width) in PHOTOS:
        rgb = cv2.resize(getattr(skdata, name)(), (width, height), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f'{name}.png'), rgb[..., ::-1])
    return str(folder)


def reference_tensor2img(tensor):
    """The reference's image writer: clamp to [-1, 1], to [0, 1], RGB->BGR, x255, round."""
    img = ((tensor[0].clamp(-1, 1) + 1) / 2).numpy().transpose(1, 2, 0)[..., ::-1]
    return (img * 255.).round().astype(np.uint8)


def reference_read(path, stage):
    """The reference's readers: OpenCV, mod-crop, RGB for stage 2 (BGR kept in stage 1), /255, (x-0.5)/0.5."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    img = img[:img.shape[0] // IR_SCALE * IR_SCALE, :img.shape[1] // IR_SCALE * IR_SCALE]
    if stage == 2:
        img = img[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()[None] / 255.
    return (x - 0.5) / 0.5


def run_test_options(tmp_path, photo_dir, weights, stage, network_color):
    model_type, dataset_type = ('VQIRModel', 'HRImageDataset') if stage == 1 else ('VQIRRFModel', 'MultiScaleHRDataset')
    opt = {
        'name': f'official_stage{stage}',
        'model_type': model_type,
        'num_gpu': 0,
        'manual_seed': 0,
        'datasets': {'test_1': {'name': 'photos', 'type': dataset_type, 'dataroot_gt': photo_dir,
                                'io_backend': {'type': 'disk'}, 'ir_scale': IR_SCALE, 'mod_crop': True}},
        'network_g': tiny_network_options(stage),
        'path': {'pretrain_network_g': weights, 'strict_load_g': True},
        'inference': {'size_mode': 'mod_crop'},
        'val': {'save_img': True, 'pbar': False, 'metrics': {
            'psnr_lr': {'type': 'calculate_psnr', 'output': 'LR', 'target': 'lq', 'crop_border': 0,
                        'test_y_channel': True}}},
    }
    if network_color != 'rgb':
        opt['network_color'] = network_color
    yml = tmp_path / f'official_stage{stage}.yml'
    yml.write_text(yaml.safe_dump(opt, sort_keys=False))
    model = run_test_pipeline(str(tmp_path), argv=['-opt', str(yml)])
    return model, tmp_path / 'results' / opt['name'] / 'photos'


@pytest.mark.parametrize('stage, network_color, outputs', [
    (2, 'rgb', ('LR', 'Level_1', 'Level_2', 'Level_4')),
    (1, 'bgr', ('LR', 'SR')),
])
def test_reference_checkpoint_and_conventions(tmp_path, photo_dir, stage, network_color, outputs):
    torch.manual_seed(stage)
    net = build_network(tiny_network_options(stage))
    spread_weights_(net, seed=10 + stage)
    net.eval()
    weights = str(tmp_path / f'vqir_stage{stage}.pth')
    torch.save(net.state_dict(), weights)  # the reference's format: a plain state_dict

    model, results = run_test_options(tmp_path, photo_dir, weights, stage, network_color)
    loaded = model.bare_net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())  # strict, complete

    for name, (height, width) in PHOTOS:
        x = reference_read(os.path.join(photo_dir, f'{name}.png'), stage)
        with torch.no_grad():
            expected = net(x, is_train=False)
        for key in outputs:
            ours = cv2.imread(str(results / key / f'{name}.png'), cv2.IMREAD_UNCHANGED)
            reference = reference_tensor2img(expected[key])
            if stage == 1:
                # the reference treats its BGR stage-1 output as RGB, so its files have red and
                # blue swapped; ours hold the same values in the right order
                reference = reference[..., ::-1]
            assert ours.shape == reference.shape, (name, key)
            diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
            assert diff.max() <= 1, (name, key, diff.max())
            if key == 'LR':
                assert diff.max() == 0, name
            else:  # the images are not flat: the comparison means something
                assert len(np.unique(ours)) > 50, (name, key)
        # the stored LR reads back as the network's LR tensor, bit for bit
        lr_file = cv2.imread(str(results / 'LR' / f'{name}.png'), cv2.IMREAD_COLOR)
        lr_network_order = lr_file[..., ::-1] if network_color == 'rgb' else lr_file
        lr = torch.from_numpy(np.ascontiguousarray(lr_network_order.transpose(2, 0, 1))).float()[None] / 255.
        assert torch.equal((lr - 0.5) / 0.5, expected['LR']), name
