"""Stage 1 (VQIRModel): only the IFRM learns, the VQGAN stays frozen and in eval mode, the
losses go down, the weights load from every supported source, and the train and test
pipelines write checkpoints, images and metrics."""
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network
from basicsr.models import build_model

from vqir.models.rescaling_base import VQGAN_PARTS
from vqir.test_pipeline import test_pipeline as run_test_pipeline
from vqir.train_pipeline import train_pipeline
from vqir.utils.checkpoint import CheckpointError
from vqir.utils.options import parse_options

from helpers import ROOT, VAL_PHOTOS, changed, fixed_batch, read_csv, snapshot, train_steps

TINY_YML = os.path.join(ROOT, 'options', 'train', 'stage1_ifrm_tiny.yml')


def tiny_options(root, photo_dirs, *overrides, is_train=True):
    train, val = photo_dirs
    argv = ['-opt', TINY_YML, '--force_yml', f'datasets:train:dataroot_gt={train}', f'datasets:val:dataroot_gt={val}',
            *overrides]
    opt, _ = parse_options(str(root), is_train=is_train, argv=argv)
    return opt


def test_training_improves_only_the_ifrm(tmp_path, photo_dirs):
    opt = tiny_options(tmp_path, photo_dirs)
    model = build_model(opt)
    net = model.bare_net
    frozen_before = snapshot(net, VQGAN_PARTS)
    ifrm_before = snapshot(net, ('icrm', ))
    assert set(k.split('.')[0] for k, _ in net.named_children()) == set(VQGAN_PARTS) | {'icrm'}

    # the optimiser holds exactly the IFRM's trainable parameters
    optimised = {id(p) for group in model.optimizer_g.param_groups for p in group['params']}
    assert optimised == {id(p) for p in net.icrm.parameters() if p.requires_grad}

    batch = fixed_batch(opt)
    logs = train_steps(model, batch, 30)
    assert list(logs[0]) == ['l_guide', 'l_feature', 'l_gram', 'l_total']
    first, last = logs[0]['l_feature'], np.mean([log['l_feature'] for log in logs[-5:]])
    # measured: 7.0e-2 at iteration 1 -> 8.9e-4 over iterations 26-30 (a factor of about 80)
    assert last < first / 20, f'feature loss {first:.3e} -> {last:.3e}'
    assert np.mean([log['l_guide'] for log in logs[-5:]]) < logs[0]['l_guide']

    for key, value in snapshot(net, VQGAN_PARTS).items():
        assert torch.equal(value, frozen_before[key]), f'frozen {key} changed'
    for name, param in net.named_parameters():
        if name.split('.')[0] in VQGAN_PARTS:
            assert not param.requires_grad and param.grad is None, name
    assert len(changed(ifrm_before, net)) > 0.9 * len(ifrm_before)

    # frozen parts stay in eval mode whatever train() is asked
    model.net_g.train()
    assert net.training and net.icrm.training
    for part in VQGAN_PARTS:
        assert all(not m.training for m in getattr(net, part).modules()), part


def test_weights_from_every_source(tmp_path, photo_dirs):
    base = tiny_options(tmp_path, photo_dirs)
    torch.manual_seed(1)
    source = build_network(dict(base['network_g']))  # another random VQGAN: its values are recognisable
    with torch.no_grad():
        for param in source.icrm.parameters():
            param.fill_(0.125)  # and an IFRM that no initialisation produces
    state = source.state_dict()
    vqgan_state = {k: v for k, v in state.items() if k.split('.')[0] in VQGAN_PARTS}

    # a taming/Lightning .ckpt: state_dict (with the loss's discriminator) beside trainer state
    taming = tmp_path / 'vqgan.ckpt'
    taming_state = dict(vqgan_state, **{'loss.discriminator.main.0.weight': torch.zeros(4, 3, 4, 4)})
    torch.save({'state_dict': taming_state, 'epoch': 3, 'global_step': 1000}, taming)
    # our stage-0 output and an official (plain state_dict) VQIR file
    ours = tmp_path / 'net_g_stage0.pth'
    torch.save({'params': vqgan_state}, ours)
    official = tmp_path / 'vqir_plain.pth'
    torch.save(state, official)

    for path in (taming, ours, official):
        model = build_model(tiny_options(tmp_path, photo_dirs, f'path:pretrain_network_vqgan={path}'))
        loaded = {k: v.cpu() for k, v in model.bare_net.state_dict().items()}
        for key, value in vqgan_state.items():
            assert torch.equal(loaded[key], value), f'{path.name}: {key}'
        # the IFRM is never read from a VQGAN source, not even from a whole VQIR file
        assert not any((v == 0.125).all() for k, v in loaded.items() if k.startswith('icrm.')), path.name

    # a whole stage-1 state, strictly; it wins over the VQGAN file
    full = tmp_path / 'net_g_1000.pth'
    torch.save({'params': state}, full)
    model = build_model(tiny_options(tmp_path, photo_dirs, f'path:pretrain_network_g={full}'))
    assert all(torch.equal(v.cpu(), state[k]) for k, v in model.bare_net.state_dict().items())

    # a VQGAN file is not a whole VQIR state: the error names the file and the right key
    with pytest.raises(CheckpointError, match='pretrain_network_vqgan') as err:
        build_model(tiny_options(tmp_path, photo_dirs, f'path:pretrain_network_g={ours}'))
    assert str(ours) in str(err.value)


def test_network_block_names_and_stage(tmp_path, photo_dirs):
    opt = tiny_options(tmp_path, photo_dirs)
    opt['network_ir'] = opt.pop('network_g')  # the reference's name
    assert build_model(opt).bare_net.stage == 1
    opt['network_g'] = dict(opt['network_ir'])
    with pytest.raises(ValueError, match='network_g .*network_ir.*both'):
        build_model(opt)
    opt = tiny_options(tmp_path, photo_dirs, 'network_g:stage=2', 'network_g:attn_mult=[1, 1]')
    with pytest.raises(ValueError, match='stage 1'):
        build_model(opt)


def test_train_and_test_pipelines(tmp_path, photo_dirs):
    root = tmp_path / 'run'
    train_pipeline(str(root), argv=[
        '-opt', TINY_YML, '--force_yml', f'datasets:train:dataroot_gt={photo_dirs[0]}',
        f'datasets:val:dataroot_gt={photo_dirs[1]}', 'train:total_iter=4', 'val:val_freq=4', 'logger:print_freq=2',
        'logger:save_checkpoint_freq=4'
    ])
    exp = root / 'experiments' / 'stage1_ifrm_tiny'
    for name in ('net_g_4.pth', 'net_g_latest.pth'):
        assert (exp / 'models' / name).is_file()
    assert (exp / 'training_states' / '4.state').is_file()
    rows = read_csv(exp / 'visualization' / 'metrics_demo_val_4.csv')
    assert [r['image'] for r in rows] == ['astronaut', 'coffee', 'mean']
    assert set(rows[0]) == {'image', 'psnr_sr', 'ssim_sr', 'psnr_lr', 'ssim_lr'}
    assert all(np.isfinite(float(r[key])) for r in rows for key in ('psnr_sr', 'ssim_sr', 'psnr_lr', 'ssim_lr'))
    losses = read_csv(exp / 'train_log.csv')
    assert [r['iter'] for r in losses] == ['2', '4'] and 'l_feature' in losses[0]
    sr = cv2.imread(str(exp / 'visualization' / 'demo_val' / 'SR' / 'astronaut_4.png'))
    lr = cv2.imread(str(exp / 'visualization' / 'demo_val' / 'LR' / 'astronaut_4.png'))
    assert sr.shape == (184, 200, 3) and lr.shape == (12, 13, 3)  # padded for the network, cropped back

    # test pipeline on the trained network, at the images' own sizes
    test_opt = {
        'name': 'stage1_tiny_test',
        'model_type': 'VQIRModel',
        'num_gpu': 0,
        'manual_seed': 0,
        'datasets': {'test_1': {'name': 'photos', 'type': 'HRImageDataset', 'dataroot_gt': photo_dirs[1],
                                'io_backend': {'type': 'disk'}, 'ir_scale': 16}},
        'network_g': yaml.safe_load(open(TINY_YML, encoding='utf-8'))['network_g'],
        'path': {'pretrain_network_g': str(exp / 'models' / 'net_g_latest.pth'), 'strict_load_g': True},
        'val': {'save_img': True, 'pbar': False, 'metrics': {
            'psnr_sr': {'type': 'calculate_psnr', 'output': 'SR', 'target': 'gt', 'crop_border': 16,
                        'test_y_channel': True},
            'psnr_lr': {'type': 'calculate_psnr', 'output': 'LR', 'target': 'lq', 'crop_border': 0,
                        'test_y_channel': True}}},
    }
    test_yml = tmp_path / 'test_stage1_tiny.yml'
    test_yml.write_text(yaml.safe_dump(test_opt, sort_keys=False))
    model = run_test_pipeline(str(root), argv=['-opt', str(test_yml)])
    results = root / 'results' / 'stage1_tiny_test'
    for name, (height, width) in VAL_PHOTOS:
        assert cv2.imread(str(results / 'photos' / 'SR' / f'{name}.png')).shape == (height, width, 3)
        lr = cv2.imread(str(results / 'photos' / 'LR' / f'{name}.png'))
        assert lr.shape == (-(-height // 16), -(-width // 16), 3)
    rows = read_csv(results / 'metrics_photos.csv')
    assert [r['image'] for r in rows] == ['astronaut', 'coffee', 'mean']
    assert float(rows[-1]['psnr_sr']) == pytest.approx(model.last_validation['mean']['psnr_sr'], abs=1e-4)


def test_mixed_precision_keeps_the_ifrm_in_float32(tmp_path, photo_dirs):
    torch.manual_seed(0)
    opt = tiny_options(tmp_path, photo_dirs, 'train:mixed_precision=bf16')
    model = build_model(opt)
    net = model.bare_net
    assert model.autocast_dtype is torch.bfloat16 and model.grad_scaler('icrm') is None
    batch = fixed_batch(opt)
    x = model.to_network(batch['gt'])
    with model.autocast():
        out = net(x, is_train=False)
    # the encoder ran in bfloat16, the codebook search, the IFRM and the 8-bit grid in float32
    assert out['LR'].dtype == out['re_quant_feat'].dtype == torch.float32
    with torch.no_grad():
        lr32 = net._features_to_lr(out['quant_feat'], noise=False)
        assert torch.equal(out['LR'], lr32)
        assert torch.equal(out['re_quant_feat'], net._lr_to_features(lr32))
    with torch.no_grad(), model.autocast():
        encoded_bf16 = net.quant_conv(net.encoder(x))
    assert encoded_bf16.dtype == torch.bfloat16

    logs = train_steps(model, batch, 30)
    first, last = logs[0]['l_feature'], np.mean([log['l_feature'] for log in logs[-5:]])
    # measured: 7.0e-2 -> 8.9e-4, as in float32 (the codebook picks the same codes)
    assert last < first / 20, f'feature loss {first:.3e} -> {last:.3e}'
    assert all(p.dtype == torch.float32 for p in net.parameters())


def overflow_first_gradients(param, count):
    """Make the gradient of ``param`` infinite in the first ``count`` backward passes (an fp16 overflow)."""
    calls = []

    def hook(grad):
        calls.append(None)
        return torch.full_like(grad, float('inf')) if len(calls) <= count else grad

    param.register_hook(hook)


def test_fp16_training_scales_the_loss_and_resumes_the_scale(tmp_path, photo_dirs):
    torch.manual_seed(0)
    opt = tiny_options(tmp_path, photo_dirs, 'train:mixed_precision=fp16')
    model = build_model(opt)
    overflow_first_gradients(model.params_g[0], 3)
    batch = fixed_batch(opt)
    logs = train_steps(model, batch, 3)
    assert model.grad_scalers['icrm'].get_scale() == 2.**16 / 8  # halved at each overflow
    assert model._bad_steps == 0  # the scaler finding its scale is not a bad step
    logs += train_steps(model, batch, 17, first=4)
    scaler = model.grad_scalers['icrm']
    assert [bool(log) for log in logs] == [False] * 3 + [True] * 17  # overflowed steps are skipped
    assert logs[-1]['l_feature'] < logs[3]['l_feature'] / 5

    model.save(0, 20)
    state = torch.load(os.path.join(opt['path']['training_states'], '20.state'), weights_only=True)
    assert state['grad_scalers']['icrm']['scale'] == scaler.get_scale()
    resumed = build_model(tiny_options(tmp_path, photo_dirs, 'train:mixed_precision=fp16'))
    resumed.resume_training(state)
    assert resumed.grad_scalers['icrm'].state_dict() == scaler.state_dict()

    # below a scale of 1 the gradients themselves are not finite: bad steps, as in float32
    resumed.grad_scalers['icrm'] = torch.amp.GradScaler('cpu', init_scale=0.5)
    overflow_first_gradients(resumed.params_g[0], 2)
    for it in (21, 22):
        resumed.feed_data(batch)
        resumed.optimize_parameters(it)
    assert resumed._bad_steps == 2


def test_ema_is_what_validation_runs(tmp_path, photo_dirs):
    """With train.ema_decay the model keeps an average of the IFRM that lags behind it, and
    validation and test run that average."""
    model = build_model(tiny_options(tmp_path, photo_dirs, 'train:ema_decay=0.9'))
    train_steps(model, fixed_batch(model.opt), 3)
    trained, averaged = model.bare_net.state_dict(), model.ema.state_dict()
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained if k.startswith('icrm.'))
    assert model.rescaler.net is model.ema.net
    with pytest.raises(ValueError, match=r'option train:ema_decay must be a number in \[0, 1\)'):
        tiny_options(tmp_path, photo_dirs, 'train:ema_decay=1.5')


def test_a_prior_with_a_colour_path_loads_it_and_keeps_it_frozen(tmp_path, photo_dirs):
    """``network_g.colour_path``: the prior's block-colour path comes from pretrain_network_vqgan with
    the rest of the VQGAN (a file without it is refused, strictly), and it does not learn."""
    opt = tiny_options(tmp_path, photo_dirs, 'network_g:colour_path=true')
    vqgan_opt = {k: v for k, v in opt['network_g'].items() if k not in ('stage', 'ir_scale', 'ifrm')}
    vqgan_opt['type'] = 'VQGAN'
    torch.manual_seed(1)
    prior = build_network(vqgan_opt)
    with torch.no_grad():
        prior.colour_path.to_latent.weight.fill_(0.25)
    ours = tmp_path / 'net_g_stage0.pth'
    torch.save({'params': prior.state_dict()}, ours)
    model = build_model(tiny_options(tmp_path, photo_dirs, 'network_g:colour_path=true',
                                     f'path:pretrain_network_vqgan={ours}'))
    net = model.bare_net
    for key, value in prior.state_dict().items():
        assert torch.equal(net.state_dict()[key].cpu(), value), key
    before = snapshot(net, ['colour_path', 'icrm'])
    train_steps(model, fixed_batch(opt), 2)
    moved = changed(before, net)
    assert any(k.startswith('icrm.') for k in moved) and not any(k.startswith('colour_path.') for k in moved)

    plain = tmp_path / 'plain.pth'
    torch.save({'params': {k: v for k, v in prior.state_dict().items() if not k.startswith('colour_path.')}}, plain)
    with pytest.raises(CheckpointError, match='colour_path'):
        build_model(tiny_options(tmp_path, photo_dirs, 'network_g:colour_path=true',
                                 f'path:pretrain_network_vqgan={plain}'))
