"""VQIR architecture: checkpoint layout, equality with the reference implementation, LR quantisation,
the downscale/upscale API and where gradients flow."""
import functools
import hashlib
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
from basicsr.utils import img2tensor, tensor2img
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from vqir.archs.ifrm_arch import IFRM, AffineCouplingLayer, InvertibleConv1x1
from vqir.archs.lr_quantizer import eight_bit_levels, quantize_lr
from vqir.archs.vqir_arch import VQIR

from helpers import FIXTURES, basicsr_log_records

OFFICIAL_KEYS = os.path.join(FIXTURES, 'reference', 'official_vqir_keys.json')
REFERENCE_OUTPUTS = os.path.join(FIXTURES, 'reference_outputs.pt')

# Small VQGAN (still downsampling by 16) so that a forward pass takes a fraction of a second.
SMALL_CONFIG = dict(in_channels=3, out_channels=3, ch=64, ch_mult=[1, 1, 1, 1, 1], double_z=False, num_res_blocks=1,
                    z_channels=64, n_embed=64, embed_dim=64)
SMALL_ATTN_MULT = [1, 1]
# Weight scales of fill_deterministic_, chosen so that random networks behave: with gain 0.5 the
# outputs stay O(1) (so an absolute tolerance means something), a codebook of std 0.1 matches
# the encoder's output scale (many codes in use), and the deep IFRM, which explodes above ~0.8,
# spreads its LR over dozens of 8-bit levels with little clipping at 0.7.
IFRM_GAIN = 0.7
LR_STEP = 2. / 255.  # one 8-bit level in [-1, 1] units


def fill_deterministic_(module, seed, gain=0.5, ifrm_gain=IFRM_GAIN, ifrm_prefix='icrm.', embedding_std=0.1):
    """Overwrite every parameter of ``module`` with values that depend only on ``seed`` and on the
    state_dict's key order and shapes, so two implementations with equal state_dict layouts get
    equal weights.

    Walking the state_dict in order, drawing from one float64 ``torch.Generator``:
    normalisation weights 1 + 0.1 N(0, 1) and biases 0.1 N(0, 1); embeddings (the codebook)
    N(0, embedding_std^2); square 2-D weights that are not ``nn.Linear`` (the IFRM's invertible 1x1 convs)
    Q diag(s) with Q the sign-fixed QR factor of a Gaussian matrix and s in [0.8, 1.25]; other
    weights N(0, 1) * gain / sqrt(fan_in) (``ifrm_gain`` under ``ifrm_prefix``); other biases
    0.02 N(0, 1). Buffers and the fixed ``haar_weights`` are kept.
    """
    generator = torch.Generator().manual_seed(seed)
    owners = dict(module.named_modules())

    def randn(shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        for key, tensor in module.state_dict(keep_vars=True).items():
            owner_name, _, leaf = key.rpartition('.')
            owner = owners[owner_name]
            if not isinstance(tensor, nn.Parameter) or leaf == 'haar_weights':
                continue
            shape = tuple(tensor.shape)
            weight_gain = ifrm_gain if key.startswith(ifrm_prefix) else gain
            if isinstance(owner, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)):
                value = (1.0 if leaf == 'weight' else 0.0) + 0.1 * randn(shape)
            elif isinstance(owner, nn.Embedding):
                value = embedding_std * randn(shape)
            elif len(shape) == 2 and shape[0] == shape[1] and not isinstance(owner, nn.Linear):
                q, r = torch.linalg.qr(randn(shape))
                q = q * torch.sign(torch.diagonal(r))  # unique factor, whatever the LAPACK sign convention
                value = q * (0.8 + 0.45 * torch.rand(shape[1], generator=generator, dtype=torch.float64))
            elif leaf == 'weight':
                value = randn(shape) * (weight_gain / math.sqrt(tensor[0].numel()))
            else:
                value = 0.02 * randn(shape)
            tensor.copy_(value.to(tensor.dtype))


def state_dict_digest(module):
    """sha256 of the state_dict's ``key:shape`` lines, in order."""
    lines = '\n'.join(f'{k}:{list(v.shape)}' for k, v in module.state_dict().items())
    return hashlib.sha256(lines.encode()).hexdigest()


def seeded_image(seed, shape):
    """Uniform random image in [-1, 1] from its own generator."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def small_vqir(stage, ir_scale, seed=1):
    """Small VQIR in eval mode with deterministic weights."""
    attn_mult = SMALL_ATTN_MULT if stage == 2 else None
    model = VQIR(stage=stage, ir_scale=ir_scale, attn_mult=attn_mult, **SMALL_CONFIG).eval()
    fill_deterministic_(model, seed)
    return model


@functools.lru_cache(maxsize=None)
def shared_vqir(stage, ir_scale, seed=1):
    """``small_vqir`` built once per test session, for tests that do not change it."""
    return small_vqir(stage, ir_scale, seed)


# --------------------------------------------------------------------------------------------
# layout of the official checkpoints

def _official():
    with open(OFFICIAL_KEYS) as f:
        return json.load(f)


@pytest.mark.parametrize('case', ['stage1_x16', 'stage1_x32', 'stage2_x16', 'stage2_x32'])
def test_state_dict_equals_official_layout(case):
    info = _official()['cases'][case]
    opt = dict(info['network_ir'])
    assert opt.pop('type') == 'VQIR'
    with torch.device('meta'):  # builds the ~80M-parameter model without allocating it
        model = ARCH_REGISTRY.get('VQIR')(**opt)
    ours = [[k, list(v.shape), str(v.dtype).replace('torch.', '')] for k, v in model.state_dict().items()]
    assert ours == info['state_dict']
    assert sum(v.numel() for v in model.state_dict().values()) == info['total_parameters']
    top_level = list(dict.fromkeys(k.split('.')[0] for k, _, _ in info['state_dict']))
    assert [name for name, _ in model.named_children()] == top_level
    # in the IFRM only the 32x Haar filters are fixed (the refinement module's own choices are its tests' concern)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad and name.startswith('icrm.')]
    assert frozen == info['parameters_with_requires_grad_false']


@pytest.mark.parametrize('case', ['stage1_x16', 'stage2_x32'])
def test_official_checkpoint_layout_loads_strictly(case):
    info = _official()['cases'][case]
    opt = dict(info['network_ir'])
    opt.pop('type')
    with torch.device('meta'):
        model = VQIR(**opt)
        checkpoint = {key: torch.empty(shape) for key, shape, _ in info['state_dict']}
    result = model.load_state_dict(checkpoint, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match='Unexpected key'):
        model.load_state_dict(dict(checkpoint, **{'loss.logvar': torch.empty(())}), strict=True, assign=True)


def test_stage2_without_attn_mult_is_a_clear_error():
    with pytest.raises(ValueError, match='attn_mult'):
        VQIR(stage=2, ir_scale=16, **SMALL_CONFIG)


@pytest.mark.parametrize('bad, match', [(dict(stage=3, ir_scale=16), 'stage'), (dict(stage=1, ir_scale=8), 'ir_scale')])
def test_bad_stage_or_scale_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        VQIR(**bad, **SMALL_CONFIG)


def test_vqgan_must_downsample_by_16():
    config = dict(SMALL_CONFIG, ch_mult=[1, 1, 1, 1])
    with pytest.raises(ValueError, match='ch_mult'):
        VQIR(stage=1, ir_scale=16, **config)


# --------------------------------------------------------------------------------------------
# initialisation

def test_init_like_reference():
    torch.manual_seed(0)
    model = VQIR(stage=2, ir_scale=32, attn_mult=SMALL_ATTN_MULT, **SMALL_CONFIG)
    # VQGAN and MSRM: truncated normal (std 0.02) convs / linears with zero bias, identity norms
    convs = [m for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.startswith('icrm')]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.std().item() - 0.02) < 0.002
    assert all(m.bias is None or not m.bias.any() for m in convs)
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    # IFRM keeps its own init: couplings start as the identity, 1x1 convs orthogonal
    couplings = [m for m in model.icrm.modules() if isinstance(m, AffineCouplingLayer)]
    assert couplings and all(not sub.conv3.weight.any() for m in couplings for sub in (m.G1, m.G2, m.H1, m.H2))
    first = model.icrm.operations[0].G1.conv1.weight  # 32 -> 32 channels, 3x3: xavier std sqrt(2 / 576), x 0.1
    assert abs(first.std().item() / (0.1 * math.sqrt(2 / 576)) - 1) < 0.1
    for m in model.icrm.modules():
        if isinstance(m, InvertibleConv1x1):
            eye = torch.eye(m.num_channels)
            assert torch.allclose(m.weight @ m.weight.T, eye, atol=1e-5)


# --------------------------------------------------------------------------------------------
# equality with the reference implementation (golden fixture, see tests/fixtures/README.md)

def _reference_fixture():
    return torch.load(REFERENCE_OUTPUTS, weights_only=True)


@pytest.mark.parametrize('case', ['stage1_x16', 'stage1_x32', 'stage2_x16', 'stage2_x32'])
def test_outputs_equal_reference(case):
    fixture = _reference_fixture()
    assert fixture['config'] == SMALL_CONFIG and fixture['ifrm_gain'] == IFRM_GAIN
    expected = fixture['cases'][case]
    network = expected['network']
    model = shared_vqir(network['stage'], network['ir_scale'], fixture['weight_seed'])
    assert network.get('attn_mult') == (SMALL_ATTN_MULT if network['stage'] == 2 else None)
    assert state_dict_digest(model) == expected['state_dict_digest']

    with torch.no_grad():
        for sample in expected['samples']:
            out = model(seeded_image(sample['seed'], sample['shape']), is_train=False)
            assert list(out) == list(sample['outputs'])
            for key, ref in sample['outputs'].items():
                assert out[key].shape == ref.shape, key
                err = (out[key] - ref).abs().max().item()
                assert err < 1e-4, f'{case} {sample["shape"]} {key}: max abs diff {err:.3g}'
            assert torch.equal(out['LR'], sample['outputs']['LR'])  # same 8-bit levels

        ifrm = expected['ifrm']
        for rev, name in ((False, 'forward'), (True, 'reverse')):
            x = torch.randn(*ifrm[name]['shape'], generator=torch.Generator().manual_seed(ifrm[name]['seed']))
            x = x * ifrm[name]['scale']
            err = (model.icrm(x, rev=rev) - ifrm[name]['output']).abs().max().item()
            assert err < 1e-4, f'{case} IFRM {name}: max abs diff {err:.3g}'


# --------------------------------------------------------------------------------------------
# 8-bit LR

def test_quantize_lr_grid_and_rounding():
    # the 256 values are those of an 8-bit image read as k / 255 (numpy) and normalised
    on_grid = (torch.from_numpy(np.arange(256, dtype=np.uint8).astype(np.float32) / 255.) - 0.5) / 0.5
    assert torch.equal(eight_bit_levels(torch.float32, torch.device('cpu')), on_grid)
    assert torch.equal(quantize_lr(on_grid), on_grid)
    on_grid64 = (torch.arange(256, dtype=torch.float64) / 255. - 0.5) / 0.5  # each dtype its own exact levels
    assert torch.equal(quantize_lr(on_grid64), on_grid64)
    assert torch.equal(quantize_lr(on_grid + 0.3 * LR_STEP), on_grid)
    lr = on_grid.clone().requires_grad_()
    assert not quantize_lr(lr).requires_grad and quantize_lr(lr, noise=True).requires_grad
    assert torch.isnan(quantize_lr(torch.tensor([float('nan'), 0.]))).tolist() == [True, False]
    # clamped to [0, 255]
    outside = (torch.tensor([-3.0, 300.0]) / 255.) * 2 - 1
    assert torch.equal(quantize_lr(outside), torch.tensor([-1., 1.]))
    # half to even, like torch.round: use the LR values that map to exactly k + 0.5 in float32
    halves = (torch.arange(255, dtype=torch.float64) + 0.5) / 255. * 2 - 1
    halves = halves.float()
    exact = (halves + 1.) / 2. * 255. == torch.arange(255) + 0.5
    assert exact.sum() > 20
    k = torch.arange(255)[exact]
    expected = ((k + k % 2).float() / 255. - 0.5) / 0.5
    assert torch.equal(quantize_lr(halves[exact]), expected)


@pytest.mark.parametrize('ir_scale', [16, 32])
def test_lr_is_on_the_8bit_grid(ir_scale):
    model = shared_vqir(1, ir_scale)
    with torch.no_grad():
        lr = model.downscale(seeded_image(5, (1, 3, 64, 96)))
    assert lr.shape == (1, 3, 64 // ir_scale, 96 // ir_scale)
    k = (lr + 1) / 2 * 255
    assert torch.equal(lr, (k.round() / 255. - 0.5) / 0.5)
    assert lr.min() >= -1 and lr.max() <= 1
    assert len(torch.unique(lr)) > 5  # the test weights give an informative LR


def test_noise_quantisation_stays_within_half_a_level():
    model = shared_vqir(1, 16)
    x = seeded_image(6, (1, 3, 64, 64))
    with torch.no_grad():
        exact = model.icrm(model.encode(x)).clamp(-1, 1)
        rounded = model.downscale(x)
        torch.manual_seed(0)
        noisy = model.downscale(x, noise=True)
        torch.manual_seed(0)
        noisy_forward = model(x, is_train=True)['LR']
    half_level = 0.5 * LR_STEP
    assert (rounded - exact).abs().max() <= half_level + 1e-6
    assert (noisy - exact).abs().max() <= half_level + 1e-6
    assert (noisy - rounded).abs().max() <= 2 * half_level + 1e-6
    assert not torch.equal(noisy, rounded)
    assert torch.equal(noisy, noisy_forward)


def test_noise_is_made_on_the_input_device():
    lr = torch.zeros(1, 3, 4, 4, device='meta')
    assert quantize_lr(lr, noise=True).device.type == 'meta'


@pytest.mark.parametrize('stage', [1, 2])
def test_lr_survives_a_png_round_trip(tmp_path, stage):
    model = shared_vqir(stage, 16)
    with torch.no_grad():
        lr = model.downscale(seeded_image(7, (1, 3, 32, 64)))
        path = str(tmp_path / 'lr.png')
        assert cv2.imwrite(path, tensor2img(lr, rgb2bgr=True, min_max=(-1, 1)))
        img = cv2.imread(path, cv2.IMREAD_UNCHANGED).astype(np.float32) / 255.
        lr_read = (img2tensor(img, bgr2rgb=True, float32=True).unsqueeze(0) - 0.5) / 0.5
        assert torch.equal(lr_read, lr)
        from_memory, from_png = model.upscale(lr), model.upscale(lr_read)
    assert list(from_png) == list(from_memory)
    assert all(torch.equal(from_png[k], from_memory[k]) for k in from_memory)


# --------------------------------------------------------------------------------------------
# API

@pytest.mark.parametrize('stage, ir_scale', [(1, 16), (1, 32), (2, 16), (2, 32)])
def test_downscale_upscale_equal_forward(stage, ir_scale):
    model = shared_vqir(stage, ir_scale)
    x = seeded_image(8, (2, 3, 32, 64))
    with torch.no_grad():
        out = model(x, is_train=False)
        quant_feat = model.encode(x)
        lr = model.downscale(x)
        up = model.upscale(lr, return_feat=True)
    h, w = 32 // ir_scale, 64 // ir_scale
    assert quant_feat.shape == (2, 64, 2, 4)
    assert lr.shape == (2, 3, h, w)
    assert torch.equal(out['LR'], lr)
    if stage == 1:
        assert list(out) == ['quant_feat', 'LR', 're_quant_feat', 'SR']
        assert torch.equal(out['quant_feat'], quant_feat)
        assert torch.equal(out['re_quant_feat'], up['re_quant_feat'])
        assert torch.equal(out['SR'], up['SR'])
        assert list(up) == ['re_quant_feat', 'SR', 'dec_feat']
    else:
        assert list(out) == ['LR', 'Level_4', 'Level_2', 'Level_1']
        assert list(up) == ['re_quant_feat', 'SR', 'Level_4', 'Level_2', 'Level_1', 'dec_feat']
        for level, size in (('Level_4', 4), ('Level_2', 2), ('Level_1', 1)):
            assert up[level].shape == (2, 3, 32 // size, 64 // size)
            assert torch.equal(out[level], up[level])
    assert up['re_quant_feat'].shape == (2, 64, 2, 4)
    assert up['SR'].shape == (2, 3, 32, 64)
    assert up['dec_feat']['Level_1'].shape == (2, 64, 32, 64)
    with torch.no_grad():
        assert 'dec_feat' not in model.upscale(lr)


def test_stage1_train_forward_keys():
    model = shared_vqir(1, 16)
    with torch.no_grad():
        out = model(seeded_image(9, (1, 3, 32, 32)), is_train=True)
    assert list(out) == ['quant_feat', 'LR', 're_quant_feat']


def test_upscale_runs_only_the_upscaling_half(monkeypatch):
    model = shared_vqir(2, 16)
    with torch.no_grad():
        lr = model.downscale(seeded_image(10, (1, 3, 32, 32)))

    def fail(*args, **kwargs):
        raise AssertionError('the encoder must not run when upscaling')

    monkeypatch.setattr(model.encoder, 'forward', fail)
    monkeypatch.setattr(model.quant_conv, 'forward', fail)
    with torch.no_grad():
        assert model.upscale(lr)['Level_1'].shape == (1, 3, 32, 32)


def test_input_shape_errors_name_the_shape():
    model = shared_vqir(1, 32)
    with pytest.raises(ValueError, match=r'\(1, 3, 48, 64\)'):
        model.downscale(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r'\(1, 4, 2, 2\)'):
        model.upscale(torch.zeros(1, 4, 2, 2))


def test_get_last_layer_is_the_decoder_output_conv():
    for stage in (1, 2):
        model = shared_vqir(stage, 16)
        assert model.get_last_layer() is model.decoder.conv_out.weight


# --------------------------------------------------------------------------------------------
# gradients: the VQGAN is frozen in both stages, the IFRM in stage 2

def _grads(model, prefixes):
    return {name: p.grad for name, p in model.named_parameters() if name.split('.')[0] in prefixes}


def test_stage1_gradients_reach_only_the_ifrm():
    model = small_vqir(1, 32).train()
    out = model(seeded_image(11, (1, 3, 32, 32)), is_train=True)
    loss = (out['re_quant_feat'] - out['quant_feat']).pow(2).mean() + out['LR'].pow(2).mean()
    loss.backward()
    vqgan = _grads(model, {'encoder', 'decoder', 'quantize', 'quant_conv', 'post_quant_conv'})
    assert vqgan and all(g is None for g in vqgan.values())
    ifrm = {name: p.grad for name, p in model.icrm.named_parameters() if p.requires_grad}
    assert all(g is not None for g in ifrm.values())
    nonzero = sum(bool(g.abs().sum() > 0) for g in ifrm.values())
    assert nonzero > 0.9 * len(ifrm)
    assert model.icrm.operations[27].haar_weights.grad is None


def test_stage2_gradients_reach_only_the_refinement():
    model = small_vqir(2, 16).train()
    out = model(seeded_image(12, (1, 3, 32, 32)), is_train=True)
    sum(v.pow(2).mean() for k, v in out.items() if k.startswith('Level')).backward()
    frozen = _grads(model, {'encoder', 'decoder', 'quantize', 'quant_conv', 'post_quant_conv', 'icrm'})
    assert frozen and all(g is None for g in frozen.values())
    # the refinement's residual blocks carry a time-embedding projection that is never used
    refine = {k: g for k, g in _grads(model, {'refine'}).items() if '.temb_proj.' not in k}
    assert refine and all(g is not None for g in refine.values())


# --------------------------------------------------------------------------------------------
# swapping the parts through the registry

class _ChannelMeanIFRM(nn.Module):
    """Toy IFRM for the swap test: channel mean to out_channels copies, and back."""

    def __init__(self, in_channels, out_channels, ir_scale, offset=0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.offset = in_channels, out_channels, offset
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, rev=False):
        if not rev:
            return (x.mean(1, keepdim=True) * self.scale + self.offset).expand(-1, self.out_channels, -1, -1)
        return x.mean(1, keepdim=True).expand(-1, self.in_channels, -1, -1)


if '_ChannelMeanIFRM' not in ARCH_REGISTRY:
    ARCH_REGISTRY.register(_ChannelMeanIFRM)


def test_ifrm_and_msrm_can_be_swapped_through_the_registry():
    model = VQIR(stage=2, ir_scale=16, **SMALL_CONFIG, ifrm={'type': '_ChannelMeanIFRM', 'offset': 0.5},
                 msrm={'type': 'MSRM', 'attn_mult': [0, 2]})
    assert isinstance(model.icrm, _ChannelMeanIFRM) and model.icrm.offset == 0.5
    assert model.icrm.in_channels == 64 and model.icrm.out_channels == 3
    assert len(model.refine.refine[0].rfb) == 0 and len(model.refine.refine[1].rfb) == 4
    assert list(model.state_dict())[-1] == 'icrm.scale'
    with torch.no_grad():
        out = model(seeded_image(13, (1, 3, 32, 32)), is_train=False)
    assert out['Level_1'].shape == (1, 3, 32, 32)
    # the default parts are the registered IFRM and MSRM
    with torch.device('meta'):
        default = VQIR(stage=2, ir_scale=32, attn_mult=SMALL_ATTN_MULT, **SMALL_CONFIG)
    assert type(default.icrm) is IFRM and default.icrm.ir_scale == 32
    assert type(default.refine) is ARCH_REGISTRY.get('MSRM')
    with pytest.raises(ValueError, match="'ifrm'"):
        VQIR(stage=1, ir_scale=16, **SMALL_CONFIG, ifrm={'in_channels': 64})


def test_norm_groups_reach_the_vqgan_and_the_msrm():
    opt = dict(stage=2, ir_scale=16, in_channels=3, out_channels=3, ch=32, ch_mult=[1, 2, 2, 2, 2], double_z=False,
               num_res_blocks=1, z_channels=64, n_embed=64, embed_dim=64, attn_mult=[1, 1], norm_groups=8)
    net = VQIR(**opt)
    groups = {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {8}
    assert any(isinstance(m, nn.GroupNorm) for m in net.refine.modules())
    default = VQIR(**dict(opt, norm_groups=32))
    assert {m.num_groups for m in default.modules() if isinstance(m, nn.GroupNorm)} == {32}
    assert [k for k, _ in net.state_dict().items()] == [k for k, _ in default.state_dict().items()]
    one_out_group = VQIR(**dict(opt, norm_out_groups=1))
    groups = {name: m.num_groups for name, m in one_out_group.named_modules() if isinstance(m, nn.GroupNorm)}
    assert groups.pop('decoder.norm_out') == 1 and set(groups.values()) == {8}
    with basicsr_log_records() as records:
        VQIR(**dict(opt, norm_out_groups=32))  # one channel a group in exactly the norm that sets the colour
    assert any("VQIR: 32 channels in 32 groups of the decoder's last GroupNorm" in r.getMessage() for r in records)


def test_colour_path_is_the_base_of_every_output():
    """A VQIR on a prior with ``colour_path``: the quantiser's input has the block means added, and
    the decoder's image (SR) and each of the MSRM's levels are put on the codes' colours, upsampled
    to that level's size."""
    opt = dict(stage=2, ir_scale=16, in_channels=3, out_channels=3, ch=32, ch_mult=[1, 2, 2, 2, 2], double_z=False,
               num_res_blocks=1, z_channels=64, n_embed=64, embed_dim=64, attn_mult=[1, 1], norm_groups=8)
    torch.manual_seed(0)
    net = VQIR(**dict(opt, colour_path=True)).eval()
    plain = VQIR(**opt).eval()
    assert plain.colour_path is None
    assert [k for k in net.state_dict() if not k.startswith('colour_path.')] == list(plain.state_dict())
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith('colour_path.')})
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        quant_feat = net.encode(x)
        z = net.quant_conv(net.encoder(x)) + net.colour_path.encode(x)
        torch.testing.assert_close(quant_feat, net.quantize(z)[0])
        lr = net.downscale(x)
        outs, plain_outs = net.upscale(lr), plain.upscale(lr)
        requant = net.quantize(outs['re_quant_feat'])[0]
    for name, size in (('SR', (64, 48)), ('Level_1', (64, 48)), ('Level_2', (32, 24)), ('Level_4', (16, 12))):
        base = net.colour_path.decode(requant, size)
        torch.testing.assert_close(outs[name], plain_outs[name] + base, msg=name)


@pytest.mark.parametrize('colour_path', [False, True])
def test_refine_residual_corrects_the_decoders_image(colour_path):
    """``refine_residual``: each MSRM level is the decoder's image, area-downscaled to it, plus the MSRM's
    image; the MSRM's image convolutions start at zero, so an untrained one gives stage 1's image."""
    import torch.nn.functional as F
    opt = dict(stage=2, ir_scale=16, in_channels=3, out_channels=3, ch=32, ch_mult=[1, 2, 2, 2, 2], double_z=False,
               num_res_blocks=1, z_channels=64, n_embed=64, embed_dim=64, attn_mult=[1, 1], norm_groups=8,
               colour_path=colour_path)
    with pytest.raises(ValueError, match='refine_residual is only used in stage 2'):
        VQIR(**dict(opt, stage=1, attn_mult=None, refine_residual=True))
    torch.manual_seed(0)
    net = VQIR(**dict(opt, refine_residual=True)).eval()
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        lr = net.downscale(x)
        outs = net.upscale(lr, return_feat=True)
        assert torch.equal(net(x, is_train=False)['Level_1'], outs['Level_1'])
    torch.testing.assert_close(outs['Level_1'], outs['SR'], atol=1e-6, rtol=0)
    if not colour_path:
        for name, size in (('Level_2', (32, 24)), ('Level_4', (16, 12))):
            torch.testing.assert_close(outs[name], F.adaptive_avg_pool2d(outs['SR'], size), msg=name)

    # trained: the MSRM's own images are added to the downscaled decoder image
    with torch.no_grad():
        for p in net.refine.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        outs = net.upscale(lr, return_feat=True)
        refined = net.refine(outs['dec_feat'])
        image = outs['SR'] - (net.colour_path.decode(net.quantize(outs['re_quant_feat'])[0]) if colour_path else 0)
    assert (outs['Level_1'] - outs['SR']).abs().max() > 1e-3
    for name, size in (('Level_1', (64, 48)), ('Level_2', (32, 24)), ('Level_4', (16, 12))):
        expected = refined[name] + F.adaptive_avg_pool2d(image, size)
        if colour_path:
            expected = expected + net.colour_path.decode(net.quantize(outs['re_quant_feat'])[0], size)
        torch.testing.assert_close(outs[name], expected, atol=1e-5, rtol=0, msg=name)
