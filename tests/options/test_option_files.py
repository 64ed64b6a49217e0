"""The shipped options files (options/train, options/test): every one passes the options check, the
paper's and the official files describe the official networks (names and shapes of the reference's
state_dicts), the benchmark files measure the field's table, and the tiny stage-0 VQGAN is f16 and
fits the tiny stage-1 config. (Errors in options files: tests/utils/test_options.py.)"""
import glob
import json
import os

import pytest
import torch
from basicsr.archs import build_network

from vqir.inference import official_network_options
from vqir.utils.options import check_options, load_options_file, parse_options

from helpers import FIXTURES, ROOT

OFFICIAL_KEYS = os.path.join(FIXTURES, 'reference', 'official_vqir_keys.json')
TAMING_KEYS_JSON = os.path.join(FIXTURES, 'reference', 'taming_vqgan_keys.json')
VQGAN_SHAPE_KEYS = ('ch', 'ch_mult', 'num_res_blocks', 'z_channels', 'n_embed', 'embed_dim')


OPTION_FILES = sorted(glob.glob(os.path.join(ROOT, 'options', 'train', 'stage[12]_*.yml')) +
                      glob.glob(os.path.join(ROOT, 'options', 'test', 'test_*.yml')) +
                      glob.glob(os.path.join(ROOT, 'options', 'test', 'benchmark_*.yml')))


@pytest.mark.parametrize('path', OPTION_FILES, ids=os.path.basename)
def test_option_files_are_valid(path):
    opt = load_options_file(path)
    check_options(opt, path, is_train=f'{os.sep}train{os.sep}' in path)


@pytest.mark.parametrize('scale', [16, 32])
def test_official_test_options(scale):
    path = os.path.join(ROOT, 'options', 'test', f'test_official_x{scale}.yml')
    opt = load_options_file(path)
    assert opt['model_type'] == 'VQIRRFModel'
    assert dict(opt['network_g']) == official_network_options(scale, stage=2)
    assert opt['path']['pretrain_network_g'] == f'pretrained/vqir_x{scale}.pth' and opt['path']['strict_load_g']
    assert opt['network_color'] == 'rgb' and opt['inference']['size_mode'] == 'mod_crop'
    for dataset in opt['datasets'].values():
        assert dataset['mod_crop'] and dataset['ir_scale'] == scale
    borders = {m['output']: m['crop_border'] for m in opt['val']['metrics'].values() if 'psnr' in m['type']}
    assert borders == {'Level_1': scale, 'Level_2': scale // 2, 'Level_4': scale // 4, 'LR': 0}
    lpips = [m for m in opt['val']['metrics'].values() if m['type'] == 'calculate_lpips']
    assert lpips and all(m['optional'] for m in lpips)


@pytest.mark.parametrize('scale', [16, 32])
def test_benchmark_options_measure_the_fields_table(scale, tmp_path):
    """The released model on DIV2K-val, CLIC2020 and LSDIR-val with the paper's protocol and every
    column of the field's table; a test set can be left out from the command line."""
    path = os.path.join(ROOT, 'options', 'test', f'benchmark_x{scale}.yml')
    opt = load_options_file(path)
    assert dict(opt['network_g']) == official_network_options(scale, stage=2)
    assert opt['path']['pretrain_network_g'] == f'pretrained/vqir_x{scale}.pth'
    assert [d['name'] for d in opt['datasets'].values()] == ['DIV2K_val', 'CLIC2020', 'LSDIR_val']
    assert all(d['mod_crop'] and d['ir_scale'] == scale for d in opt['datasets'].values())
    types = {m['type'] for m in opt['val']['metrics'].values() if m['output'] == 'Level_1' and m['target'] == 'gt'}
    assert types == {'calculate_psnr', 'calculate_ssim', 'calculate_lpips', 'calculate_dists', 'calculate_fid',
                     'calculate_kid'}
    assert {m['crop_border'] for m in opt['val']['metrics'].values() if m['type'] in ('calculate_psnr', 'calculate_ssim')
            and m['output'] == 'Level_1'} == {scale}
    parsed, _ = parse_options(str(tmp_path), is_train=False, argv=['-opt', path, '--force_yml', 'datasets:test_2=~'])
    assert [d['name'] for d in parsed['datasets'].values()] == ['DIV2K_val', 'LSDIR_val']


@pytest.mark.parametrize('stage, scale', [(1, 16), (1, 32), (2, 16), (2, 32)])
def test_paper_options_build_the_official_networks(stage, scale):
    train_name = {1: f'stage1_ifrm_x{scale}', 2: f'stage2_msrm_x{scale}'}[stage]
    files = [os.path.join(ROOT, 'options', 'train', f'{train_name}.yml'),
             os.path.join(ROOT, 'options', 'test', f'test_stage{stage}_x{scale}.yml')]
    if stage == 2:
        files.append(os.path.join(ROOT, 'options', 'test', f'test_official_x{scale}.yml'))
    for path in files:
        assert dict(load_options_file(path)['network_g']) == official_network_options(scale, stage=stage), path
    if not os.path.isfile(OFFICIAL_KEYS):
        pytest.skip(f'{OFFICIAL_KEYS} not available')
    with open(OFFICIAL_KEYS, encoding='utf-8') as f:
        case = json.load(f)['cases'][f'stage{stage}_x{scale}']
    with torch.device('meta'):  # names and shapes only, no memory
        net = build_network(official_network_options(scale, stage=stage))
    ours = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert ours == [[k, shape] for k, shape, _ in case['state_dict']]


# ---------------------------------------------------------------------------------------------- stage 0




def _parse(yml, tmp_path, is_train=True):
    opt, _ = parse_options(str(tmp_path), is_train=is_train, argv=['-opt', f'{ROOT}/{yml}'])
    return opt


def test_f16_options_build_the_papers_vqgan(tmp_path):
    """stage0_vqgan_f16.yml: taming's f16_1024 VQGAN, parameter for parameter (names and shapes of the
    reference's VQGAN), and taming's loss settings."""
    if not os.path.isfile(TAMING_KEYS_JSON):
        pytest.skip(f'{TAMING_KEYS_JSON} is not available')
    opt = _parse('options/train/stage0_vqgan_f16.yml', tmp_path)
    with open(TAMING_KEYS_JSON, encoding='utf-8') as f:
        reference = json.load(f)
    net = build_network(dict(opt['network_g']))
    shapes = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert shapes == [[k, shape] for k, shape, _ in reference['state_dict']]
    loss = opt['train']['vqgan_loss_opt']
    assert loss['perceptual_weight'] == 1.0 and loss['codebook_weight'] == 1.0
    assert loss['disc_weight'] == 0.8 and loss['gan_type'] == 'hinge'
    assert opt['train']['optim_g']['betas'] == [0.5, 0.9] and opt['datasets']['train']['gt_size'] == 256
    assert opt['train']['optim_g']['lr'] == pytest.approx(4.5e-6 * opt['datasets']['train']['batch_size_per_gpu'])


def test_tiny_options_fit_stage1_and_the_test_options(tmp_path):
    """The tiny stage-0 VQGAN is f16 and is the VQGAN that the tiny stage-1 config expects."""
    train = _parse('options/train/stage0_vqgan_tiny.yml', tmp_path)
    test = _parse('options/test/test_stage0_vqgan_tiny.yml', tmp_path, is_train=False)
    stage1 = _parse('options/train/stage1_ifrm_tiny.yml', tmp_path)
    assert len(train['network_g']['ch_mult']) - 1 == 4  # f16
    assert train['network_g'] == test['network_g']
    assert {k: train['network_g'][k] for k in VQGAN_SHAPE_KEYS} == {k: stage1['network_g'][k] for k in VQGAN_SHAPE_KEYS}
    assert train['train']['vqgan_loss_opt']['perceptual_weight'] == 0
    assert train['train']['vqgan_loss_opt']['disc_start'] > train['train']['total_iter'] // 2
