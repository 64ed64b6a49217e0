"""LR images that survive JPEG: kornia's differentiable JPEG against the real encoder, the
train.lr_jpeg channel of stages 1 and 2, and validation through a real JPEG."""
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network
from basicsr.models import build_model
from kornia.enhance import jpeg_codec_differentiable
from skimage import data as skdata

from vqir.models.lr_jpeg import LRJPEG, real_jpeg

from helpers import ROOT, fixed_batch, parse_train_options, train_steps

STAGE1_YML = os.path.join(ROOT, 'options', 'train', 'stage1_ifrm_tiny.yml')
STAGE2_YML = os.path.join(ROOT, 'options', 'train', 'stage2_msrm_tiny.yml')


def _psnr(a, b):
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def _thumbnails():
    """LR-sized photos (8x8 as in training crops, and odd sizes) as (1, 3, h, w) RGB on the 8-bit grid."""
    out = []
    for name, (h, w) in (('coffee', (8, 8)), ('astronaut', (27, 37)), ('chelsea', (19, 28))):
        rgb = cv2.resize(getattr(skdata, name)(), (w, h), interpolation=cv2.INTER_AREA)
        out.append(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.)
    return out


@pytest.mark.parametrize('quality', [50, 75, 90, 95])
def test_differentiable_jpeg_follows_the_real_encoder(quality):
    """At the qualities training draws from, kornia's codec degrades an LR as libjpeg does (OpenCV,
    4:2:0): its distortion is within 1 dB of the real one, and the two decoded images agree."""
    for lr in _thumbnails():
        real = real_jpeg(lr, quality)
        soft = jpeg_codec_differentiable(lr, torch.tensor([float(quality)]))
        assert abs(_psnr(soft, lr) - _psnr(real, lr)) < 1.0, (tuple(lr.shape), _psnr(soft, lr), _psnr(real, lr))
        assert _psnr(soft, real) > 30


def test_the_lr_channel_draws_a_quality_per_sample_and_passes_gradients():
    lr = torch.cat([_thumbnails()[0]] * 6).requires_grad_(True)
    torch.manual_seed(0)
    out = LRJPEG((50, 95), prob=0.5)(lr)
    kept = [torch.equal(o, i) for o, i in zip(out.detach(), lr.detach())]
    assert 0 < sum(kept) < 6  # prob 0.5: some samples untouched
    coded = [o for o, k in zip(out.detach(), kept) if not k]
    assert len({round(_psnr(c[None], lr[:1].detach()), 3) for c in coded}) == len(coded)  # qualities differ
    out.sum().backward()
    assert lr.grad is not None and lr.grad.abs().sum() > 0
    # the real codec (stage 2) gives exactly the decoded JPEG files
    torch.manual_seed(1)
    real = LRJPEG((75, 75), differentiable=False)(lr.detach())
    assert torch.equal(real, real_jpeg(lr.detach(), 75))


def test_stage1_trains_through_the_jpeg_and_validates_through_a_real_one(tmp_path, photo_dirs):
    model = build_model(parse_train_options(STAGE1_YML, tmp_path, photo_dirs, 'train:lr_jpeg={quality: [50, 90]}',
                                 'val:lr_jpeg_quality=75'))
    batch = fixed_batch(model.opt)
    logs = train_steps(model, batch, 12)
    assert all(np.isfinite(log['l_total']) for log in logs)
    assert np.mean([log['l_feature'] for log in logs[-3:]]) < logs[0]['l_feature']

    model.feed_data({'gt': batch['gt'][:1], 'lq': batch['lq'][:1]})
    model.test()
    png_lr = model.rescaler.downscale(model.gt)
    shared = real_jpeg(png_lr, 75)
    assert torch.equal(model.output['LR'], shared)  # what the upscaler received
    expected = model.rescaler.upscale(shared, out_size=model.gt.shape[-2:])['SR']
    assert torch.equal(model.output['SR'], expected)


def test_stage2_fine_tunes_on_real_jpeg_lrs(tmp_path, photo_dirs):
    """The frozen IFRM's inverse and the MSRM see exactly what JPEG files of the LR decode to."""
    with open(STAGE1_YML, encoding='utf-8') as f:
        net_opt = yaml.safe_load(f)['network_g']
    torch.manual_seed(7)
    stage1 = str(tmp_path / 'net_g_stage1.pth')
    torch.save({'params': build_network(net_opt).state_dict()}, stage1)
    model = build_model(parse_train_options(STAGE2_YML, tmp_path, photo_dirs, f'path:pretrain_network_g={stage1}',
                                 'train:perceptual_opt:loss_weight=0', 'train:lr_jpeg={quality: [60, 60]}'))
    seen = []
    channel = model.lr_channel
    model.lr_channel = lambda lr: seen.append((lr, channel(lr))) or seen[-1][1]
    logs = train_steps(model, fixed_batch(model.opt), 2)
    assert len(seen) == 2 and all(np.isfinite(v) for log in logs for v in log.values())
    for lr, received in seen:
        assert torch.equal(received, model.to_network(real_jpeg(model.from_network(lr), 60)))
        assert not torch.equal(received, lr)


@pytest.mark.parametrize('overrides, message', [
    (['train:lr_jpeg={quality: [90, 50]}'], r'option train:lr_jpeg: quality must be \[low, high\]'),
    (['train:lr_jpeg={quality: [50, 90], prob: 0}'], r'option train:lr_jpeg: prob must be a number in \(0, 1\]'),
    (['val:lr_jpeg_quality=0'], 'option val:lr_jpeg_quality must be an integer from 1 to 100'),
])
def test_lr_jpeg_options_are_checked(tmp_path, photo_dirs, overrides, message):
    with pytest.raises(ValueError, match=message):  # by the options check, before a run creates anything
        parse_train_options(STAGE1_YML, tmp_path, photo_dirs, *overrides)
