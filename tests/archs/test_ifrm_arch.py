"""IFRM: exact inverses of the invertible steps, the cached inverse of the 1x1 convolution, the Haar
squeeze, the non-invertible steps' wiring, and the official checkpoint layout."""
import json
import os

import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY

from vqir.archs.ifrm_arch import (IFRM, AffineCouplingLayer, ChannelProjection1x1, GatedAttentionStep, HaarSqueeze,
                                  InvertibleConv1x1, haar_filters)

from helpers import FIXTURES

OFFICIAL_KEYS = os.path.join(FIXTURES, 'reference', 'official_vqir_keys.json')
SHAPES = [(1, 8, 5, 7), (3, 16, 8, 8), (2, 4, 1, 9)]  # batch > 1, non-square, a single row


def randomize_(module, seed, std=0.1):
    """Replace a fresh module's identity-like init (zero last convs) by small random weights;
    keeps the Haar filters and invertible-conv matrices."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith('haar_weights') or (p.dim() == 2 and p.shape[0] == p.shape[1]):
                continue
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def _randn(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------
# affine coupling layer

@pytest.mark.parametrize('shape', SHAPES)
def test_coupling_layer_is_invertible(shape):
    channels = shape[1]
    layer = AffineCouplingLayer(channels // 2, channels // 2)
    randomize_(layer, seed=channels, std=0.2)
    x = _randn(shape, 1)
    with torch.no_grad():
        y = layer(x)
        assert (y - x).abs().max() > 0.1  # the random layer is far from the identity
        err = (layer(y, rev=True) - x).abs().max().item()
        assert err < 1e-5, err
        assert (layer(layer(x, rev=True)) - x).abs().max() < 1e-5  # also the other way round


def test_coupling_layer_is_invertible_in_float64():
    layer = AffineCouplingLayer(4, 4).double()
    randomize_(layer, seed=0, std=0.3)
    x = _randn((2, 8, 6, 5), 2, torch.float64)
    with torch.no_grad():
        assert (layer(layer(x), rev=True) - x).abs().max() < 1e-12


def test_coupling_layer_formula_and_clamp():
    layer = AffineCouplingLayer(3, 5, clamp=1.0)
    randomize_(layer, seed=1, std=1.0)
    x = _randn((2, 8, 4, 4), 3)
    with torch.no_grad():
        x1, x2 = x[:, :3], x[:, 3:]
        y1 = x1 * torch.exp(2 * torch.sigmoid(layer.G2(x2)) - 1) + layer.H2(x2)
        y2 = x2 * torch.exp(2 * torch.sigmoid(layer.G1(y1)) - 1) + layer.H1(y1)
        assert torch.allclose(layer(x), torch.cat([y1, y2], 1), atol=1e-6)
        # the multiplicative part is bounded by exp(+-clamp): with H = 0 the output / input ratio is
        zero_shift = AffineCouplingLayer(3, 5)
        randomize_(zero_shift, seed=2, std=3.0)
        for h in (zero_shift.H1, zero_shift.H2):
            for p in h.parameters():
                p.zero_()
        ratio = zero_shift(x) / x
        assert ratio.min() >= torch.exp(torch.tensor(-1.)) - 1e-6 and ratio.max() <= torch.exp(torch.tensor(1.)) + 1e-6


def test_fresh_coupling_layer_is_the_identity():
    torch.manual_seed(0)
    layer = AffineCouplingLayer(8, 8)
    x = _randn((2, 16, 5, 5), 4)
    assert torch.equal(layer(x), x) and torch.equal(layer(x, rev=True), x)
    assert not layer.G1.conv3.weight.any() and layer.G1.conv1.weight.abs().max() > 0


def test_coupling_layer_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r'AffineCouplingLayer.*\(B, 16, H, W\).*\(1, 12, 4, 4\)'):
        AffineCouplingLayer(8, 8)(torch.zeros(1, 12, 4, 4))


# --------------------------------------------------------------------------------------------
# invertible 1x1 convolution

def test_invertible_conv_init_is_orthogonal():
    torch.manual_seed(0)
    conv = InvertibleConv1x1(16)
    assert conv.weight.shape == (16, 16)
    assert torch.allclose(conv.weight @ conv.weight.T, torch.eye(16), atol=1e-5)


def _non_orthogonal_conv(channels, seed):
    conv = InvertibleConv1x1(channels)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels) + 0.3 * _randn((channels, channels), seed))
    return conv


@pytest.mark.parametrize('shape', SHAPES)
def test_invertible_conv_is_invertible_cached_and_uncached(shape):
    conv = _non_orthogonal_conv(shape[1], seed=shape[0])
    x = _randn(shape, 5)
    # uncached: gradients enabled for a trainable weight
    y = conv(x)
    back = conv(y, rev=True)
    assert back.grad_fn is not None and conv._inverse_cache is None
    err_uncached = (back - x).abs().max().item()
    # cached: no_grad
    with torch.no_grad():
        back_cached = conv(conv(x), rev=True)
    assert conv._inverse_cache is not None
    err_cached = (back_cached - x).abs().max().item()
    assert err_uncached < 1e-5 and err_cached < 1e-5, (err_uncached, err_cached)


def test_cached_inverse_equals_fresh_inverse_and_is_reused():
    conv = _non_orthogonal_conv(12, seed=1)
    fresh = torch.linalg.inv(conv.weight.detach().double()).float()
    with torch.no_grad():
        first = conv.inverse_weight()
        second = conv.inverse_weight()
    assert torch.equal(first, fresh)
    assert second is first  # reused, not recomputed


def test_cached_inverse_is_invalidated_when_the_weight_changes():
    conv = _non_orthogonal_conv(12, seed=2)

    def cached():
        with torch.no_grad():
            return conv.inverse_weight()

    def fresh():
        return torch.linalg.inv(conv.weight.detach().double()).float()

    before = cached()
    # an optimiser step
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    conv(_randn((1, 12, 3, 3), 3), rev=True).square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0  # gradient flows through the inverse
    optimizer.step()
    after_step = cached()
    assert not torch.equal(after_step, before) and torch.equal(after_step, fresh())
    # load_state_dict
    other = _non_orthogonal_conv(12, seed=3)
    conv.load_state_dict(other.state_dict())
    after_load = cached()
    assert torch.equal(after_load, torch.linalg.inv(other.weight.detach().double()).float())
    # an in-place edit through .data, which does not bump the version counter
    conv.weight.data.mul_(2)
    assert torch.equal(cached(), fresh())
    # a dtype change
    conv.double()
    inverse64 = cached()
    assert inverse64.dtype == torch.float64
    assert torch.equal(inverse64, torch.linalg.inv(conv.weight.detach()))


def test_frozen_invertible_conv_uses_the_cache_even_with_grad_enabled():
    conv = _non_orthogonal_conv(6, seed=4).requires_grad_(False)
    with torch.inference_mode():  # e.g. a validation run first
        first = conv.inverse_weight()
    assert conv.inverse_weight() is first
    # the cached inverse is a normal tensor: it can be saved for backward towards the input
    x = _randn((1, 6, 3, 3), 16).requires_grad_()
    conv(x, rev=True).sum().backward()
    assert x.grad is not None and conv.weight.grad is None


def test_invertible_conv_cache_is_not_in_the_state_dict():
    conv = _non_orthogonal_conv(6, seed=5)
    with torch.no_grad():
        conv.inverse_weight()
    assert list(conv.state_dict()) == ['weight']


# --------------------------------------------------------------------------------------------
# Haar squeeze

def test_haar_filters():
    filters = haar_filters(2)
    assert filters.shape == (8, 1, 2, 2)
    base = filters[:4, 0].reshape(4, 4)
    assert torch.equal(base @ base.T, 4 * torch.eye(4))  # orthogonal up to the factor 4
    assert torch.equal(filters[4:], filters[:4])


@pytest.mark.parametrize('shape', [(1, 3, 4, 6), (2, 16, 8, 8), (3, 2, 2, 10)])
def test_haar_squeeze_is_exactly_invertible(shape):
    squeeze = HaarSqueeze(shape[1])
    x = _randn(shape, 6)
    y = squeeze(x)
    assert y.shape == (shape[0], 4 * shape[1], shape[2] // 2, shape[3] // 2)
    err = (squeeze(y, rev=True) - x).abs().max().item()
    assert err < 1e-6, err
    assert (squeeze(squeeze(y, rev=True)) - y).abs().max() < 1e-6


def test_haar_squeeze_sub_bands_and_channel_order():
    x = _randn((1, 2, 4, 4), 7)
    y = HaarSqueeze(2)(x)
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    bands = [(a + b + c + d) / 4, (a - b + c - d) / 4, (a + b - c - d) / 4, (a - b - c + d) / 4]
    # output channel k * C + c is sub-band k of input channel c
    assert torch.allclose(y, torch.cat(bands, dim=1), atol=1e-6)


def test_haar_squeeze_is_stateless_and_fixed():
    squeeze = HaarSqueeze(4)
    assert not squeeze.haar_weights.requires_grad
    assert list(squeeze.state_dict()) == ['haar_weights'] and squeeze.haar_weights.shape == (16, 1, 2, 2)
    y = _randn((2, 16, 3, 5), 8)
    first = squeeze(y, rev=True)  # reverse before any forward
    squeeze(_randn((1, 4, 10, 2), 9))  # a forward on another shape changes nothing
    assert torch.equal(squeeze(y, rev=True), first)
    assert not squeeze.__dict__.keys() & {'elements', 'last_jac'}


def test_haar_squeeze_rejects_odd_sizes():
    with pytest.raises(ValueError, match=r'even.*\(1, 2, 5, 4\)'):
        HaarSqueeze(2)(torch.zeros(1, 2, 5, 4))


# --------------------------------------------------------------------------------------------
# the non-invertible steps

def test_channel_projection_uses_separate_convolutions():
    step = ChannelProjection1x1(8, 3)
    x = _randn((2, 8, 4, 5), 10)
    y = step(x)
    assert y.shape == (2, 3, 4, 5) and torch.equal(y, step.conv1(x))
    back = step(y, rev=True)
    assert back.shape == x.shape and torch.equal(back, step.conv2(y))
    assert step.conv2.weight.shape == (8, 3, 1, 1)
    assert (back - x).abs().max() > 0.1  # conv2 is learned separately, not an inverse


def test_gated_attention_step_uses_separate_networks():
    torch.manual_seed(0)
    step = GatedAttentionStep(8, 4)
    x = _randn((2, 8, 5, 3), 11)
    with torch.no_grad():
        assert torch.equal(step(x), step.forw_att(x))
        assert torch.equal(step(x, rev=True), step.back_att(x))
        assert not torch.equal(step(x), step(x, rev=True))
        # the block is x + a(x) * sigmoid(b(x))
        a, b = step.forw_att.conv_a(x), step.forw_att.conv_b(x)
        assert torch.allclose(step(x), x + a * torch.sigmoid(b), atol=1e-6)
    assert step.forw_att.conv_a[0].conv[0].weight.shape == (4, 8, 1, 1)
    assert step.forw_att.conv_a[0].conv[2].weight.shape == (4, 4, 3, 3)
    assert step.forw_att.conv_b[3].weight.shape == (8, 8, 1, 1)


# --------------------------------------------------------------------------------------------
# the whole IFRM

@pytest.mark.parametrize('ir_scale', [16, 32])
def test_ifrm_state_dict_equals_official_icrm_entries(ir_scale):
    with open(OFFICIAL_KEYS) as f:
        entries = json.load(f)['cases'][f'stage1_x{ir_scale}']['state_dict']
    expected = [[key[len('icrm.'):], shape] for key, shape, _ in entries if key.startswith('icrm.')]
    with torch.device('meta'):
        ifrm = ARCH_REGISTRY.get('IFRM')(in_channels=256, out_channels=3, ir_scale=ir_scale)
    assert [[k, list(v.shape)] for k, v in ifrm.state_dict().items()] == expected
    assert len(expected) == (769 if ir_scale == 16 else 1149)


@pytest.mark.parametrize('ir_scale', [16, 32])
def test_ifrm_shapes(ir_scale):
    torch.manual_seed(0)
    ifrm = IFRM(in_channels=64, out_channels=3, ir_scale=ir_scale)
    randomize_(ifrm, seed=1, std=0.05)
    feats = _randn((2, 64, 4, 6), 12)
    with torch.no_grad():
        lr = ifrm(feats)
        factor = ir_scale // 16
        assert lr.shape == (2, 3, 4 // factor, 6 // factor)
        assert ifrm(lr, rev=True).shape == feats.shape


def test_ifrm_reverse_does_not_need_a_forward_first():
    torch.manual_seed(0)
    ifrm = IFRM(in_channels=64, out_channels=3, ir_scale=32)
    randomize_(ifrm, seed=2, std=0.05)
    lr = _randn((1, 3, 2, 3), 13)
    with torch.no_grad():
        first = ifrm(lr, rev=True)
        ifrm(_randn((2, 64, 8, 4), 14))
        assert torch.equal(ifrm(lr, rev=True), first)


def test_ifrm_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    ifrm = IFRM(in_channels=64, out_channels=3, ir_scale=32)
    randomize_(ifrm, seed=3, std=0.05)
    feats = _randn((1, 64, 2, 2), 15)
    lr = ifrm(feats)
    (ifrm(lr, rev=True) - feats).square().mean().backward()
    trainable = {n: p for n, p in ifrm.named_parameters() if p.requires_grad}
    assert len(trainable) == len(list(ifrm.parameters())) - 1  # all but the Haar filters
    assert all(p.grad is not None for p in trainable.values())


def test_ifrm_argument_errors():
    with pytest.raises(ValueError, match='ir_scale'):
        IFRM(in_channels=64, out_channels=3, ir_scale=8)
    with pytest.raises(ValueError, match='multiple of 64'):
        IFRM(in_channels=48, out_channels=3)
    ifrm = IFRM(in_channels=64, out_channels=3)
    with pytest.raises(ValueError, match=r'IFRM: .*\(B, 64, H, W\).*\(1, 3, 4, 4\)'):
        ifrm(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r'IFRM \(reverse\).*\(B, 3, H, W\)'):
        ifrm(torch.zeros(1, 64, 4, 4), rev=True)


def test_ifrm_layout():
    ifrm16 = IFRM(in_channels=64, out_channels=3, ir_scale=16)
    ifrm32 = IFRM(in_channels=64, out_channels=3, ir_scale=32)
    kinds = {AffineCouplingLayer: 'C', InvertibleConv1x1: 'I', ChannelProjection1x1: 'P', GatedAttentionStep: 'A',
             HaarSqueeze: 'H'}
    def layout(steps):
        return ''.join(kinds[type(s)] for s in steps)

    assert layout(ifrm16.operations) == 'CCC' + 'PIACCC' * 4
    assert layout(ifrm32.operations) == 'CCC' + 'PIACCC' * 4 + 'HICCC' + 'PIACCC' * 2
    assert layout(ifrm16.inpfeat_extraction) == layout(ifrm32.inpfeat_extraction) == 'PIAP'
    # attention hidden width: half the channels for 16x, all of them for 32x (official checkpoints)
    assert ifrm16.operations[5].forw_att.conv_a[0].conv[0].out_channels == 16
    assert ifrm32.operations[5].forw_att.conv_a[0].conv[0].out_channels == 32
    assert isinstance(ifrm32.operations[27], HaarSqueeze) and ifrm32.operations[27].channels == 4


def test_ifrm_halvings_set_the_width_of_the_lr_head():
    """With 64-channel codes, the official 4 halvings leave 2 channels before the LR's 1x1 convolution,
    so every LR pixel lies on a plane of RGB (warned); 2 halvings give the official head's widths (16 -> 8 -> 3)."""
    from helpers import basicsr_log_records
    with basicsr_log_records() as records:
        IFRM(in_channels=256, out_channels=3)
        IFRM(in_channels=64, out_channels=3, halvings=2)
    assert not [r for r in records if r.levelname == 'WARNING']
    with basicsr_log_records() as records:
        narrow = IFRM(in_channels=64, out_channels=3)
    assert any('leave 2 channels before the 3-channel LR' in r.getMessage() and 'at most 3' in r.getMessage()
               for r in records)
    torch.manual_seed(0)
    ifrm16 = IFRM(in_channels=64, out_channels=3, halvings=2)
    ifrm32 = IFRM(in_channels=64, out_channels=3, ir_scale=32, halvings=2)
    kinds = {AffineCouplingLayer: 'C', InvertibleConv1x1: 'I', ChannelProjection1x1: 'P', GatedAttentionStep: 'A',
             HaarSqueeze: 'H'}
    assert ''.join(kinds[type(s)] for s in ifrm16.operations) == 'CCC' + 'PIACCC' * 2
    assert ''.join(kinds[type(s)] for s in ifrm32.operations) == 'CCC' + 'PIACCC' * 2 + 'HICCC' + 'PIACCC' * 2
    for ifrm in (ifrm16, ifrm32):
        head = ifrm.inpfeat_extraction
        assert (head[0].in_channels, head[0].out_channels, head[3].out_channels) == (16, 8, 3)

    # the LR's pixels span the colours with 3+ channels before the head's last step, a plane with 2
    def lr_rank(ifrm):
        randomize_(ifrm, seed=4, std=0.2)
        with torch.no_grad():
            lr = ifrm(_randn((1, 64, 8, 8), 16))
        pixels = lr.flatten(2)[0].t()
        return torch.linalg.matrix_rank(pixels - pixels.mean(0), rtol=1e-4).item()

    assert lr_rank(ifrm16) == 3 and lr_rank(narrow) == 2
    with pytest.raises(ValueError, match='halvings'):
        IFRM(in_channels=64, out_channels=3, halvings=0)
