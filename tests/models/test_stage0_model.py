"""Stage 0 (VQGANModel): a tiny VQGAN learns, the discriminator starts on time, taming
checkpoints load, and validation reports image metrics plus codebook usage."""
import argparse
import csv
import logging
from collections import OrderedDict

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.metrics import calculate_psnr
from basicsr.models import build_model
from basicsr.utils import tensor2img
from skimage import data as skdata
from torch.utils.data import DataLoader, Dataset

from vqir.metrics.codebook_metric import codebook_usage
from vqir.archs.vqgan_arch import VectorQuantizer
from vqir.models.codebook_restart import DeadCodeRestart
from vqir.models.vqgan_model import VQGANModel
from vqir.utils.img_util import pad_to_multiple

FACTOR = 4  # ch_mult [1, 1, 2]: two downsamplings


def make_opt(tmp_path, is_train=True, disc_start=10**9, lr=1e-3, network_d=None, path=None):
    """Options as ``parse_options`` hands them to a model."""
    opt = {
        'name': 'stage0_test',
        'model_type': 'VQGANModel',
        'num_gpu': 0,
        'dist': False,
        'rank': 0,
        'world_size': 1,
        'is_train': is_train,
        'network_g': {
            'type': 'VQGAN', 'ch': 32, 'ch_mult': [1, 1, 2], 'num_res_blocks': 1, 'z_channels': 16,
            'embed_dim': 16, 'n_embed': 64
        },
        'network_d': network_d or {'type': 'PatchGANDiscriminator', 'input_nc': 3, 'ndf': 8, 'n_layers': 2},
        'path': dict(path or {}, visualization=str(tmp_path / 'visualization'), results_root=str(tmp_path / 'results'),
                     models=str(tmp_path / 'models'), training_states=str(tmp_path / 'training_states')),
        'train': {
            'optim_g': {'type': 'Adam', 'lr': lr, 'betas': [0.5, 0.9]},
            'optim_d': {'type': 'Adam', 'lr': lr, 'betas': [0.5, 0.9]},
            'vqgan_loss_opt': {'type': 'VQGANLoss', 'disc_start': disc_start, 'perceptual_weight': 0.0,
                               'disc_weight': 0.8},
        },
        'val': {
            'save_img': True,
            'pbar': False,
            'metrics': {
                'psnr': {'type': 'calculate_psnr', 'output': 'rec', 'target': 'gt', 'crop_border': 0,
                         'test_y_channel': False},
                'ssim': {'type': 'calculate_ssim', 'output': 'rec', 'target': 'gt', 'crop_border': 0,
                         'test_y_channel': False},
            },
        },
    }
    return opt


def photo(size_hw, name='astronaut'):
    """(1, 3, H, W) RGB in [0, 1] from a scikit-image photo."""
    h, w = size_hw
    img = cv2.resize(getattr(skdata, name)(), (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    return torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()


def reconstruct(model, gt):
    model.feed_data({'gt': gt})
    model.test()
    return model.output['rec']


def l1_and_psnr(rec, gt):
    rec = rec.clamp(0, 1)
    return (rec - gt).abs().mean().item(), 10 * np.log10(1 / ((rec - gt)**2).mean().item())


def test_tiny_vqgan_overfits_one_image(tmp_path):
    torch.manual_seed(0)
    model = build_model(make_opt(tmp_path))
    assert isinstance(model, VQGANModel)
    gt = photo((32, 32))
    l1_before, psnr_before = l1_and_psnr(reconstruct(model, gt), gt)
    for it in range(1, 61):
        model.feed_data({'gt': gt})
        model.optimize_parameters(it)
    l1_after, psnr_after = l1_and_psnr(reconstruct(model, gt), gt)
    # measured: L1 0.269 -> 0.040 (6.8x), PSNR 9.7 -> 25.2 dB
    assert l1_after * 4 <= l1_before, (l1_before, l1_after)
    assert psnr_after >= psnr_before + 10, (psnr_before, psnr_after)
    assert list(model.log_dict) == ['l_rec', 'l_codebook', 'l_g_gan', 'd_weight', 'l_d', 'perplexity']
    assert 1 <= model.log_dict['perplexity'] <= 64


def test_bf16_vqgan_training(tmp_path):
    torch.manual_seed(0)
    opt = make_opt(tmp_path, disc_start=30)
    opt['train']['mixed_precision'] = 'bf16'
    model = build_model(opt)
    gt = photo((32, 32))
    l1_before, _ = l1_and_psnr(reconstruct(model, gt), gt)
    for it in range(1, 61):
        model.feed_data({'gt': gt})
        model.optimize_parameters(it)
        assert all(np.isfinite(v) for v in model.log_dict.values()), (it, model.log_dict)
    l1_after, _ = l1_and_psnr(reconstruct(model, gt), gt)
    # measured: L1 0.269 -> 0.053 (float32 with the same schedule: 0.058)
    assert l1_after * 4 <= l1_before, (l1_before, l1_after)
    assert model.log_dict['l_d'] != 0 and model.log_dict['d_weight'] > 0  # the GAN ran from iteration 31

    opt['train']['mixed_precision'] = 'fp16'
    with pytest.raises(ValueError, match='mixed_precision fp16 is not supported in stage 0'):
        build_model(opt)


def test_dead_codes_restart_at_encoder_outputs():
    quantizer = VectorQuantizer(8, 4)
    before = quantizer.embedding.weight.detach().clone()
    restart = DeadCodeRestart(quantizer, interval=3)
    z = torch.randn(2, 4, 3, 5)
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 4)
    used = torch.tensor([1, 6])
    indices = used[torch.arange(30) % 2]  # only codes 1 and 6 are ever chosen
    assert restart.update(z, indices) == 0 and restart.update(z, indices) == 0
    assert torch.equal(quantizer.embedding.weight, before)  # nothing happens between checks
    assert restart.update(z, indices) == 6
    weight = quantizer.embedding.weight.detach()
    assert torch.equal(weight[used], before[used])
    for code in (0, 2, 3, 4, 5, 7):  # each dead code now sits on one of the batch's encoder outputs
        assert (vectors - weight[code]).abs().sum(1).min().item() == 0
    # the counts start again: a code used in the next interval is kept
    assert restart.update(z, torch.arange(30) % 8) == 0
    with pytest.raises(ValueError, match='positive integer'):
        DeadCodeRestart(quantizer, interval=0)


def test_restart_counts_survive_a_resume(tmp_path):
    torch.manual_seed(0)
    opt = make_opt(tmp_path)
    opt['train']['codebook_restart_every'] = 4
    model = build_model(opt)
    gt = photo((32, 32))
    for it in range(1, 7):  # one check at 4, then 2 iterations of the next interval
        model.feed_data({'gt': gt})
        model.optimize_parameters(it)
    model.save(0, 6)
    state = torch.load(str(tmp_path / 'training_states' / '6.state'), weights_only=True)
    saved = state['codebook_restart']
    assert saved['iterations'] == 2 and saved['hits'].sum().item() == 2 * 8 * 8  # 2 steps x 8x8 positions
    assert torch.equal(saved['hits'], model.code_restart.hits)

    resumed = build_model(opt)
    resumed.resume_training(state)
    assert resumed.code_restart.iterations == 2 and torch.equal(resumed.code_restart.hits, saved['hits'])
    # so the next check comes at iteration 8, as without the interruption: a code used only in
    # iterations 5-6 is not restarted
    z = torch.randn(1, 16, 2, 2)
    kept = int(saved['hits'].nonzero()[0])
    before = resumed.code_restart.quantizer.embedding.weight[kept].clone()
    assert resumed.code_restart.update(z, torch.full((4, ), (kept + 1) % 64)) == 0
    assert resumed.code_restart.update(z, torch.full((4, ), (kept + 1) % 64)) > 0
    assert torch.equal(resumed.code_restart.quantizer.embedding.weight[kept], before)


def test_codebook_restarts_keep_more_codes_in_use(tmp_path):
    """Trained from scratch, the tiny VQGAN leaves most codes unused; restarts bring them into use."""
    gt = torch.cat([photo((32, 32), name) for name in ('astronaut', 'coffee', 'chelsea', 'rocket')])
    used = {}
    for every in (None, 5):
        torch.manual_seed(0)
        opt = make_opt(tmp_path)
        opt['train']['codebook_restart_every'] = every
        model = build_model(opt)
        for it in range(1, 31):
            model.feed_data({'gt': gt})
            model.optimize_parameters(it)
        with torch.no_grad():
            _, _, (_, _, indices) = model.net_g.encode(model.to_network(gt))
        used[every] = round(codebook_usage(indices, 64)['used_fraction'] * 64)
    assert 'codes_restarted' in model.log_dict
    # measured: 20 of 64 codes in use without restarts, 59 with
    assert used[5] >= 2 * used[None] and used[5] >= 48, used


def _params(net):
    return [t.detach().clone() for t in net.state_dict().values()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_discriminator_trains_from_disc_start_only(tmp_path):
    torch.manual_seed(0)
    model = build_model(make_opt(tmp_path, disc_start=3))
    gt = torch.cat([photo((32, 32)), photo((32, 32), 'coffee')])
    d_init, g_before = _params(model.net_d), _params(model.net_g)
    for it in (1, 2):
        model.feed_data({'gt': gt})
        model.optimize_parameters(it)
        assert model.log_dict['l_d'] == 0 and model.log_dict['l_g_gan'] == 0 and model.log_dict['d_weight'] == 0
    # before disc_start the discriminator is not even run (its BatchNorm statistics are untouched)
    assert _same(_params(model.net_d), d_init)
    assert not model.optimizer_d.state
    assert not _same(_params(model.net_g), g_before)

    model.feed_data({'gt': gt})
    model.optimize_parameters(3)
    assert not _same(_params(model.net_d), d_init)
    assert model.optimizer_d.state
    assert model.log_dict['l_d'] > 0 and model.log_dict['d_weight'] > 0 and model.log_dict['l_g_gan'] != 0
    # the discriminator is trainable again after the autoencoder step froze it
    assert all(p.requires_grad for p in model.net_d.parameters())


def test_unet_discriminator_by_type(tmp_path):
    torch.manual_seed(0)
    opt = make_opt(tmp_path, disc_start=1, network_d={'type': 'UNetDiscriminatorSN', 'num_in_ch': 3, 'num_feat': 8})
    model = build_model(opt)
    assert type(model.net_d).__name__ == 'UNetDiscriminatorSN'
    model.feed_data({'gt': photo((32, 32))})
    model.optimize_parameters(1)
    assert model.log_dict['l_d'] > 0 and np.isfinite(model.log_dict['d_weight'])


def test_non_finite_batch_skips_the_step(tmp_path):
    torch.manual_seed(0)
    model = build_model(make_opt(tmp_path, disc_start=1))
    before_g = _params(model.net_g)
    before_d = [p.detach().clone() for p in model.net_d.parameters()]
    gt = photo((32, 32))
    gt[0, 0, 3, 3] = float('nan')
    model.feed_data({'gt': gt})
    model.optimize_parameters(1)
    assert _same(_params(model.net_g), before_g)
    # parameters only: the discriminator's BatchNorm statistics see the bad batch in the forward pass
    assert _same([p.detach() for p in model.net_d.parameters()], before_d)
    assert model._bad_steps == 1


def test_taming_ckpt_loads_through_pretrain_network_g(tmp_path):
    torch.manual_seed(0)
    source = build_model(make_opt(tmp_path, disc_start=1))
    gt = photo((32, 32))
    for it in (1, 2):  # move the weights (and BatchNorm statistics) away from any initialisation
        source.feed_data({'gt': gt})
        source.optimize_parameters(it)
    g_state, d_state = source.net_g.state_dict(), source.net_d.state_dict()
    state_dict = OrderedDict(g_state)
    state_dict.update((f'loss.discriminator.{k}', v) for k, v in d_state.items())
    state_dict['loss.perceptual_loss.lin0.model.1.weight'] = torch.randn(1, 64, 1, 1)
    ckpt = {
        'epoch': 3,
        'global_step': 1234,
        'pytorch-lightning_version': '1.0.8',
        'state_dict': state_dict,
        'optimizer_states': [o.state_dict() for o in source.optimizers],
        'lr_schedulers': [],
        'hparams': argparse.Namespace(embed_dim=16, n_embed=64),  # a non-tensor object, as Lightning stores
    }
    ckpt_path = tmp_path / 'last.ckpt'
    torch.save(ckpt, ckpt_path)

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger('basicsr')
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        torch.manual_seed(1)  # a different initialisation, overwritten by the checkpoint
        loaded = build_model(make_opt(tmp_path, path={'pretrain_network_g': str(ckpt_path),
                                                      'pretrain_network_d': str(ckpt_path)}))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert torch.equal(reconstruct(loaded, gt), reconstruct(source, gt))
    for key, value in d_state.items():
        assert torch.equal(loaded.net_d.state_dict()[key], value), key
    # the generator load drops the loss.* entries (discriminator and LPIPS) and says so
    dropped = [m for m in messages if 'dropped' in m and 'loss.*' in m]
    assert dropped and f'dropped {len(d_state) + 1} keys' in dropped[0]

    # inference-only models load the same file
    test_model = build_model(make_opt(tmp_path, is_train=False, path={'pretrain_network_g': str(ckpt_path)}))
    assert torch.equal(reconstruct(test_model, gt), reconstruct(source, gt))
    assert not hasattr(test_model, 'net_d')


class TinyValSet(Dataset):
    def __init__(self, images):
        self.images = images
        self.opt = {'name': 'tiny_val'}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        name, img = self.images[index]
        return {'gt': img[0], 'gt_path': f'/nowhere/{name}.png'}


class RecordingTB:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)


def test_validation_reports_metrics_and_codebook_usage(tmp_path):
    torch.manual_seed(0)
    model = build_model(make_opt(tmp_path, is_train=False))
    images = [('square', photo((32, 32))), ('odd', photo((38, 54), 'coffee'))]  # 38x54: not multiples of 4
    tb = RecordingTB()
    model.opt['is_train'] = True  # validation during training: CSV and images under visualization/
    model.nondist_validation(DataLoader(TinyValSet(images), batch_size=1), 7, tb, save_img=True)
    result = model.last_validation
    assert list(result['mean']) == ['psnr', 'ssim', 'codebook_perplexity', 'codebook_used_fraction']

    # the odd-sized image went through the network reflect-padded to 40x56 and was cropped back
    vqgan = model.net_g
    all_indices, expected_psnr = [], {}
    for name, gt in images:
        with torch.no_grad():
            x = gt * 2 - 1
            padded = F.pad(x, (0, -x.shape[-1] % FACTOR, 0, -x.shape[-2] % FACTOR), mode='reflect')
            assert torch.equal(padded, pad_to_multiple(x, FACTOR))
            quant, _, (_, _, indices) = vqgan.encode(padded)
            rec = (vqgan.decode(quant)[..., :x.shape[-2], :x.shape[-1]] + 1) / 2
        assert torch.allclose(reconstruct(model, gt), rec, atol=1e-6)
        all_indices.append(indices)
        expected_psnr[name] = calculate_psnr(tensor2img(rec), tensor2img(gt), crop_border=0)
        saved = cv2.imread(str(tmp_path / 'visualization' / 'tiny_val' / 'rec' / f'{name}_7.png'))
        assert saved.shape == (gt.shape[2], gt.shape[3], 3)
    assert all_indices[1].numel() == (40 // FACTOR) * (56 // FACTOR)
    usage = codebook_usage(torch.cat(all_indices), 64)
    assert result['mean']['codebook_perplexity'] == pytest.approx(usage['perplexity'])
    assert result['mean']['codebook_used_fraction'] == pytest.approx(usage['used_fraction'])
    assert model.last_codebook_usage['codebook_perplexity'] == pytest.approx(usage['perplexity'])
    for row in result['rows']:
        assert row['psnr'] == pytest.approx(expected_psnr[row['image']], abs=1e-6)

    with open(tmp_path / 'visualization' / 'metrics_tiny_val_7.csv', newline='') as f:
        table = list(csv.reader(f))
    assert table[0] == ['image', 'psnr', 'ssim', 'codebook_perplexity', 'codebook_used_fraction']
    assert [row[0] for row in table[1:]] == ['square', 'odd', 'mean']
    assert table[1][3:] == ['', ''] and table[2][3:] == ['', '']
    assert float(table[3][3]) == pytest.approx(usage['perplexity'], abs=1e-4)
    assert float(table[3][4]) == pytest.approx(usage['used_fraction'], abs=1e-4)
    assert float(table[3][1]) == pytest.approx(np.mean(list(expected_psnr.values())), abs=1e-4)
    for key in ('psnr', 'ssim', 'codebook_perplexity', 'codebook_used_fraction'):
        assert f'metrics/tiny_val/{key}' in tb.scalars
    assert tb.scalars['metrics/tiny_val/codebook_used_fraction'] == (pytest.approx(usage['used_fraction']), 7)
    assert model.codebook_usage is None  # indices are only gathered during a validation


def test_codebook_usage_without_image_metrics(tmp_path):
    torch.manual_seed(0)
    opt = make_opt(tmp_path, is_train=False)
    del opt['val']['metrics']
    model = build_model(opt)
    for _ in range(2):  # a second validation of the same name rewrites the CSV, not extends it
        model.nondist_validation(DataLoader(TinyValSet([('square', photo((32, 32)))]), batch_size=1), 'x', None,
                                 save_img=False)
    assert list(model.last_validation['mean']) == ['codebook_perplexity', 'codebook_used_fraction']
    with open(tmp_path / 'results' / 'metrics_tiny_val.csv', newline='') as f:
        table = list(csv.reader(f))
    assert table[0] == ['image', 'codebook_perplexity', 'codebook_used_fraction'] and table[1][0] == 'mean'
    assert len(table) == 2


def test_missing_training_options_are_named(tmp_path):
    opt = make_opt(tmp_path)
    del opt['train']['vqgan_loss_opt']
    opt['opt_path'] = '/x/stage0.yml'
    with pytest.raises(ValueError, match=r'/x/stage0.yml: option train:vqgan_loss_opt is required'):
        build_model(opt)
