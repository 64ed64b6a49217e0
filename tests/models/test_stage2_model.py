"""Stage 2 (VQIRRFModel): only the MSRM and the discriminator learn, VQGAN and IFRM come from the
stage-1 checkpoint and never change, the losses go down, the GAN schedule and both LPIPS paths
work, and the train and test pipelines write checkpoints, images per level and metrics."""
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network
from basicsr.models import build_model

from vqir.test_pipeline import test_pipeline as run_test_pipeline
from vqir.train_pipeline import train_pipeline
from vqir.utils.checkpoint import CheckpointError
from vqir.utils.lpips_weights import LPIPSWeightsNotFoundError
from vqir.utils.options import parse_options

from helpers import ROOT, VAL_PHOTOS, changed, fixed_batch, photo_folders, read_csv, snapshot, train_steps

TINY_YML = os.path.join(ROOT, 'options', 'train', 'stage2_msrm_tiny.yml')
STAGE1_TINY_YML = os.path.join(ROOT, 'options', 'train', 'stage1_ifrm_tiny.yml')
FROZEN_PARTS = ('encoder', 'decoder', 'quantize', 'quant_conv', 'post_quant_conv', 'icrm')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """Photo folders and a stage-1 checkpoint (our format) of the tiny network."""
    base = tmp_path_factory.mktemp('stage2')
    train, val = photo_folders(str(base))
    with open(STAGE1_TINY_YML, encoding='utf-8') as f:
        stage1_net_opt = yaml.safe_load(f)['network_g']
    torch.manual_seed(7)
    stage1 = build_network(stage1_net_opt)
    ckpt = str(base / 'net_g_stage1.pth')
    torch.save({'params': stage1.state_dict()}, ckpt)
    return {'train': train, 'val': val, 'stage1': ckpt, 'stage1_state': stage1.state_dict()}


def tiny_options(root, setup, *overrides, is_train=True):
    argv = ['-opt', TINY_YML, '--force_yml', f'datasets:train:dataroot_gt={setup["train"]}',
            f'datasets:val:dataroot_gt={setup["val"]}', f'path:pretrain_network_g={setup["stage1"]}', *overrides]
    opt, _ = parse_options(str(root), is_train=is_train, argv=argv)
    return opt


def test_training_refines_only_the_msrm(tmp_path, setup):
    opt = tiny_options(tmp_path, setup, 'train:perceptual_opt:loss_weight=0', 'train:gan_start_iter=0')
    model = build_model(opt)
    net, net_d = model.bare_net, model.get_bare_model(model.net_d)
    assert model.cri_perceptual is None  # weight 0: not built
    # VQGAN and IFRM come from the stage-1 file
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in setup['stage1_state'].items())
    frozen_before, refine_before, d_before = snapshot(net, FROZEN_PARTS), snapshot(net, ('refine', )), snapshot(net_d)
    optimised = {id(p) for group in model.optimizer_g.param_groups for p in group['params']}
    assert optimised == {id(p) for p in net.refine.parameters() if p.requires_grad}

    batch = fixed_batch(opt)
    logs = train_steps(model, batch, 25)
    assert list(logs[0]) == ['l_pix', 'l_edge', 'l_g_gan', 'l_g_total', 'l_d_real', 'l_d_fake', 'l_d']
    first, last = logs[0]['l_pix'], np.mean([log['l_pix'] for log in logs[-5:]])
    # measured: L1 summed over the three levels 1.14 at iteration 1 -> 0.79 over iterations 21-25 (x0.70)
    assert last < 0.85 * first, f'L1 {first:.3f} -> {last:.3f}'
    assert all(log['l_d'] != 0 for log in logs)  # the discriminator ran on every iteration

    assert changed(frozen_before, net) == []
    for name, param in net.named_parameters():
        if name.split('.')[0] in FROZEN_PARTS:
            assert not param.requires_grad and param.grad is None, name
    assert len(changed(refine_before, net)) > 0.9 * len(refine_before)
    assert len(changed(d_before, net_d)) > 0.9 * len(d_before)

    model.net_g.train()
    assert net.refine.training
    for part in FROZEN_PARTS:
        assert all(not m.training for m in getattr(net, part).modules()), part


def test_a_residual_msrm_starts_at_the_decoders_image_and_learns(tmp_path, setup):
    """``network_g.refine_residual``: before training, the final image is stage 1's (the decoder's);
    training moves the MSRM and lowers the L1."""
    opt = tiny_options(tmp_path, setup, 'network_g:refine_residual=true', 'train:perceptual_opt:loss_weight=0',
                       'train:gan_start_iter=100')
    model = build_model(opt)
    net = model.bare_net
    batch = fixed_batch(opt)
    x = batch['gt'] * 2 - 1
    with torch.no_grad():
        lr = net.downscale(x)
        outs = net.upscale(lr)
    torch.testing.assert_close(outs['Level_1'], outs['SR'], atol=1e-6, rtol=0)
    refine_before = snapshot(net, ('refine', ))
    logs = train_steps(model, batch, 25)
    first, last = logs[0]['l_pix'], np.mean([log['l_pix'] for log in logs[-5:]])
    assert last < 0.95 * first, f'L1 {first:.3f} -> {last:.3f}'
    assert len(changed(refine_before, net)) > 0.9 * len(refine_before)


def test_gan_start_and_discriminator_warm_up(tmp_path, setup):
    # GAN on after iteration 1; the MSRM waits for 2 discriminator iterations (basicsr's net_d_init_iters)
    opt = tiny_options(tmp_path, setup, 'train:perceptual_opt:loss_weight=0', 'train:gan_start_iter=1',
                       'train:net_d_init_iters=2')
    model = build_model(opt)
    net, net_d = model.bare_net, model.get_bare_model(model.net_d)
    batch = fixed_batch(opt)
    steps = []
    for it in (1, 2, 3):
        refine_before, d_before = snapshot(net, ('refine', )), snapshot(net_d)
        model.feed_data(batch)
        model.optimize_parameters(it)
        steps.append((bool(changed(refine_before, net)), bool(changed(d_before, net_d))))
    # (MSRM stepped, discriminator stepped) per iteration
    assert steps == [(False, False), (False, True), (True, True)]
    assert model.log_dict['l_g_gan'] != 0 and model.log_dict['l_d'] != 0


def test_lpips_with_a_random_backbone(tmp_path, setup):
    opt = tiny_options(tmp_path, setup)  # the tiny options: LPIPS with pretrained_backbone: false
    model = build_model(opt)
    net = model.bare_net
    assert model.cri_perceptual is not None
    refine_before = snapshot(net, ('refine', ))
    batch = fixed_batch(opt)
    for it in (1, 2):
        model.feed_data(batch)
        model.optimize_parameters(it)
        assert np.isfinite(model.log_dict['l_percep']) and model.log_dict['l_percep'] > 0
    assert changed(refine_before, net)
    assert all(not p.requires_grad and p.grad is None for p in model.cri_perceptual.parameters())


def test_bf16_training_with_every_loss(tmp_path, setup):
    torch.manual_seed(0)
    opt = tiny_options(tmp_path, setup, 'train:mixed_precision=bf16', 'train:gan_start_iter=0')
    model = build_model(opt)
    net, net_d = model.bare_net, model.get_bare_model(model.net_d)
    d_before = snapshot(net_d)
    batch = fixed_batch(opt)
    logs = train_steps(model, batch, 15)
    assert all(log and all(np.isfinite(v) for v in log.values()) for log in logs)
    assert all(log['l_percep'] > 0 and log['l_d'] != 0 for log in logs)
    first, last = logs[0]['l_pix'], np.mean([log['l_pix'] for log in logs[-3:]])
    # measured: L1 summed over the levels 1.14 -> 0.85 over iterations 13-15, as in float32
    assert last < 0.85 * first, f'L1 {first:.3f} -> {last:.3f}'
    assert len(changed(d_before, net_d)) > 0.9 * len(d_before)
    assert all(p.dtype == torch.float32 for p in list(net.parameters()) + list(net_d.parameters()))


def test_missing_lpips_weights_stop_the_run_before_it_creates_anything(tmp_path, setup, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty_torch_home'))
    root = tmp_path / 'run'
    with pytest.raises(LPIPSWeightsNotFoundError) as err:
        train_pipeline(str(root), argv=[
            '-opt', TINY_YML, '--force_yml', f'datasets:train:dataroot_gt={setup["train"]}',
            f'datasets:val:dataroot_gt={setup["val"]}', f'path:pretrain_network_g={setup["stage1"]}',
            'train:perceptual_opt:pretrained_backbone=true'
        ])
    message = str(err.value)
    assert 'vgg16-397923af.pth' in message and os.path.join(str(tmp_path / 'empty_torch_home'), 'hub',
                                                            'checkpoints') in message
    assert message.startswith(f'{TINY_YML}: option train:perceptual_opt: ')
    assert not root.exists()  # found before the run created anything


def test_checkpoints_must_fit(tmp_path, setup):
    # testing needs every weight: a stage-1 file lacks the MSRM
    with pytest.raises(CheckpointError, match='refine'):
        build_model(tiny_options(tmp_path, setup, is_train=False))
    # in training only a wholly absent refine.* is accepted; a missing IFRM entry is an error
    state = dict(setup['stage1_state'])
    dropped = next(k for k in state if k.startswith('icrm.'))
    del state[dropped]
    broken = tmp_path / 'broken.pth'
    torch.save({'params': state}, broken)
    with pytest.raises(CheckpointError, match=dropped.replace('.', r'\.')):
        build_model(tiny_options(tmp_path, setup, f'path:pretrain_network_g={broken}'))


def test_train_and_test_pipelines(tmp_path, setup):
    root = tmp_path / 'run'
    train_pipeline(str(root), argv=[
        '-opt', TINY_YML, '--force_yml', f'datasets:train:dataroot_gt={setup["train"]}',
        f'datasets:val:dataroot_gt={setup["val"]}', f'path:pretrain_network_g={setup["stage1"]}',
        'train:total_iter=4', 'train:gan_start_iter=2', 'val:val_freq=4', 'logger:print_freq=2',
        'logger:save_checkpoint_freq=4'
    ])
    exp = root / 'experiments' / 'stage2_msrm_tiny'
    for name in ('net_g_4.pth', 'net_d_4.pth', 'net_g_latest.pth', 'net_d_latest.pth'):
        assert (exp / 'models' / name).is_file(), name
    assert (exp / 'training_states' / '4.state').is_file()
    rows = read_csv(exp / 'visualization' / 'metrics_demo_val_4.csv')
    assert [r['image'] for r in rows] == ['astronaut', 'coffee', 'mean']
    assert set(rows[0]) == {'image', 'psnr_level1', 'ssim_level1', 'psnr_level2', 'psnr_level4', 'psnr_lr'}
    losses = read_csv(exp / 'train_log.csv')
    assert [r['iter'] for r in losses] == ['2', '4']
    assert float(losses[0]['l_d']) == 0 and float(losses[1]['l_d']) != 0  # GAN from iteration 3 on
    vis = exp / 'visualization' / 'demo_val'
    expected = {'LR': (12, 13), 'Level_1': (184, 200), 'Level_2': (92, 100), 'Level_4': (46, 50)}
    for key, size in expected.items():
        assert cv2.imread(str(vis / key / 'astronaut_4.png')).shape[:2] == size, key

    with open(TINY_YML, encoding='utf-8') as f:
        net_opt = yaml.safe_load(f)['network_g']
    level_metric = {'type': 'calculate_psnr', 'test_y_channel': True}
    test_opt = {
        'name': 'stage2_tiny_test',
        'model_type': 'VQIRRFModel',
        'num_gpu': 0,
        'manual_seed': 0,
        'datasets': {'test_1': {'name': 'photos', 'type': 'MultiScaleHRDataset', 'dataroot_gt': setup['val'],
                                'io_backend': {'type': 'disk'}, 'ir_scale': 16}},
        'network_g': net_opt,
        'path': {'pretrain_network_g': str(exp / 'models' / 'net_g_latest.pth'), 'strict_load_g': True},
        # the VQGAN decoder's own image too: kept, saved and measured like the levels
        'inference': {'decoder_image': True},
        'val': {'save_img': True, 'pbar': False, 'outputs': ['LR', 'Level_1', 'Level_2', 'Level_4', 'SR'], 'metrics': {
            'psnr_sr': dict(level_metric, output='SR', target='gt', crop_border=16),
            'psnr_level1': dict(level_metric, output='Level_1', target='gt', crop_border=16),
            'psnr_level2': dict(level_metric, output='Level_2', target='gt_level2', crop_border=8),
            'psnr_level4': dict(level_metric, output='Level_4', target='gt_level4', crop_border=4),
            'psnr_lr': dict(level_metric, output='LR', target='lq', crop_border=0)}},
    }
    test_yml = tmp_path / 'test_stage2_tiny.yml'
    test_yml.write_text(yaml.safe_dump(test_opt, sort_keys=False))
    model = run_test_pipeline(str(root), argv=['-opt', str(test_yml)])
    results = root / 'results' / 'stage2_tiny_test'
    for name, (height, width) in VAL_PHOTOS:
        for key, factor in (('Level_1', 1), ('Level_2', 2), ('Level_4', 4), ('LR', 16), ('SR', 1)):
            img = cv2.imread(str(results / 'photos' / key / f'{name}.png'))
            assert img.shape == (-(-height // factor), -(-width // factor), 3), (name, key)
    rows = read_csv(results / 'metrics_photos.csv')
    assert [r['image'] for r in rows] == ['astronaut', 'coffee', 'mean']
    assert set(rows[0]) == {'image', 'psnr_sr', 'psnr_level1', 'psnr_level2', 'psnr_level4', 'psnr_lr'}
    assert float(rows[0]['psnr_sr']) != float(rows[0]['psnr_level1'])  # a different image
    assert float(rows[-1]['psnr_level1']) == pytest.approx(model.last_validation['mean']['psnr_level1'], abs=1e-4)
