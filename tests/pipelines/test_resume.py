"""A resumed run follows the uninterrupted one: N iterations straight == N/2, stop, ``--auto_resume``,
N/2 more (same seed, data loaded in the main process), for the stage-0 VQGAN, the stage-1 IFRM and
the stage-1 IFRM with its EMA; and a resumed stage-2 run keeps the frozen VQGAN and IFRM exactly as
in the stage-1 checkpoint."""
from os import path as osp

import pytest
import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY

from vqir.train_pipeline import train_pipeline
from vqir.utils.checkpoint import load_state_dict, save_state_dict

from helpers import ROOT, STAGE0_NAME, read_csv, stage0_train_argv

STAGE1_YML = osp.join(ROOT, 'options', 'train', 'stage1_ifrm_tiny.yml')
STAGE2_YML = osp.join(ROOT, 'options', 'train', 'stage2_msrm_tiny.yml')


def stage_argv(yml, demo, *force, extra=()):
    return ['-opt', yml, *extra, '--force_yml', f'datasets:train:dataroot_gt={demo}/train',
            f'datasets:val:dataroot_gt={demo}/val', 'datasets:train:gt_size=32', 'datasets:train:batch_size_per_gpu=2',
            'val=~', 'logger:pbar=false', 'logger:print_freq=1', *force]


# case: (iterations straight, the columns of train_log.csv compared, their tolerance)
RESUME_CASES = {
    # the tiny stage-0 config as it is; the discriminator starts before the stop and trains across it
    'stage0': (8, ('l_rec', 'l_codebook', 'l_g_gan', 'd_weight', 'l_d', 'perplexity'), dict(abs=1e-6)),
    # the tiny stage-1 config on 32-pixel crops, without and with train.ema_decay
    'stage1': (6, ('l_guide', 'l_feature', 'l_gram', 'l_total'), dict(rel=1e-5, abs=1e-7)),
    'stage1_ema': (6, ('l_guide', 'l_feature', 'l_gram', 'l_total'), dict(rel=1e-5, abs=1e-7)),
}


@pytest.mark.parametrize('case', list(RESUME_CASES))
def test_resumed_run_follows_the_uninterrupted_run(tmp_path, request, case):
    total, columns, tolerance = RESUME_CASES[case]
    ema = case == 'stage1_ema'
    if case == 'stage0':
        data_dirs = request.getfixturevalue('data_dirs')
        common = ['logger:print_freq=1', 'logger:save_checkpoint_freq=4', 'val:val_freq=100',
                  'train:vqgan_loss_opt:disc_start=3', 'datasets:train:num_worker_per_gpu=0']

        def argv(*force, extra=()):
            return stage0_train_argv(data_dirs, *force, *common, extra=extra)

        name = STAGE0_NAME
    else:
        demo = request.getfixturevalue('demo')
        common = ['logger:save_checkpoint_freq=3'] + (['train:ema_decay=0.5'] if ema else [])

        def argv(*force, extra=()):
            return stage_argv(STAGE1_YML, demo, *force, *common, extra=extra)

        name = 'stage1_ifrm_tiny'
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    train_pipeline(straight, argv=argv(f'train:total_iter={total}'))
    train_pipeline(split, argv=argv(f'train:total_iter={total // 2}'))
    train_pipeline(split, argv=argv(f'train:total_iter={total}', extra=['--auto_resume']))
    exp = osp.join('experiments', name)
    rows_straight = read_csv(osp.join(straight, exp, 'train_log.csv'))
    rows_split = read_csv(osp.join(split, exp, 'train_log.csv'))
    assert [int(r['iter']) for r in rows_split] == list(range(1, total + 1))
    for a, b in zip(rows_straight, rows_split):
        for column in columns:
            assert float(a[column]) == pytest.approx(float(b[column]), **tolerance), (a['iter'], column)
    if case == 'stage0':
        assert float(rows_split[-1]['l_d']) > 0  # the discriminator trained across the resume
        return
    for param_key in ('params', 'params_ema') if ema else ('params', ):
        weights_straight = load_state_dict(osp.join(straight, exp, 'models', f'net_g_{total}.pth'), param_key=param_key)
        weights_split = load_state_dict(osp.join(split, exp, 'models', f'net_g_{total}.pth'), param_key=param_key)
        for key, value in weights_straight.items():
            torch.testing.assert_close(weights_split[key], value, rtol=1e-5, atol=1e-6, msg=(param_key, key))
    if ema:  # the average lags behind the trained IFRM; the frozen VQGAN is the same in both
        params, averaged = (load_state_dict(osp.join(split, exp, 'models', f'net_g_{total}.pth'), param_key=k)
                            for k in ('params', 'params_ema'))
        assert any(not torch.equal(params[k], averaged[k]) for k in params if k.startswith('icrm.'))
        assert all(torch.equal(params[k], averaged[k]) for k in params if not k.startswith('icrm.'))


def _tiny_vqir(yml, seed):
    with open(yml, encoding='utf-8') as f:
        net_opt = dict(yaml.safe_load(f)['network_g'])
    torch.manual_seed(seed)
    return ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt)


def test_stage2_resume_keeps_the_frozen_stage1_weights(tmp_path, demo):
    stage1 = tmp_path / 'stage1.pth'
    save_state_dict(_tiny_vqir(STAGE1_YML, seed=0), str(stage1), param_key='params')
    other_vqgan = tmp_path / 'other_vqgan.pth'  # a different prior, which the stage-1 weights must override
    save_state_dict(_tiny_vqir(STAGE1_YML, seed=1), str(other_vqgan), param_key='params')
    frozen = {k: v for k, v in load_state_dict(str(stage1)).items() if not k.startswith('refine.')}
    assert any(not torch.equal(v, load_state_dict(str(other_vqgan))[k]) for k, v in frozen.items())

    root = str(tmp_path / 'root')
    exp = osp.join(root, 'experiments', 'stage2_msrm_tiny')
    common = [f'path:pretrain_network_g={stage1}', f'path:pretrain_network_vqgan={other_vqgan}',
              'logger:save_checkpoint_freq=2', 'train:gan_start_iter=1', 'train:perceptual_opt:loss_weight=0']
    train_pipeline(root, argv=stage_argv(STAGE2_YML, demo, 'train:total_iter=2', *common))
    model = train_pipeline(root, argv=stage_argv(STAGE2_YML, demo, 'train:total_iter=4', *common,
                                                 extra=['--auto_resume']))
    assert model.opt['path']['resume_state'] == osp.join(exp, 'training_states', '2.state')

    saved = {name: load_state_dict(osp.join(exp, 'models', f'net_g_{name}.pth')) for name in ('2', '4', 'latest')}
    in_memory = model.bare_net.state_dict()
    for key, value in frozen.items():
        for name, weights in saved.items():
            assert torch.equal(weights[key], value), (name, key)
        assert torch.equal(in_memory[key], value), key
    refine = [k for k in saved['4'] if k.startswith('refine.')]
    assert refine and any(not torch.equal(saved['2'][k], saved['4'][k]) for k in refine)  # the MSRM did train
