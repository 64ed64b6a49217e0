"""MSRM (stage-2 multi-scale refinement) and its axial attention blocks."""
import json
import os

import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY

from vqir.archs import axial_attention
from vqir.archs.axial_attention import InterAxialBlock, IntraAxialBlock
from vqir.archs.msrm_arch import MSRM

from helpers import FIXTURES

OFFICIAL_KEYS = os.path.join(FIXTURES, 'reference', 'official_vqir_keys.json')
SMALL = dict(ch=64, ch_mult=[1, 1, 1], attn_mult=[1, 1])


def _small_feats(batch, height, width, seed=0):
    """Decoder-like features for SMALL: Level_1 (B, 64, H, W), Level_2 (H/2), Level_4 (H/4)."""
    g = torch.Generator().manual_seed(seed)
    return {f'Level_{s}': torch.randn(batch, 64, height // s, width // s, generator=g) for s in (1, 2, 4)}


def _randomize(module, seed=0, qkv_gain=4.0):
    """Non-trivial weights everywhere; the query/key/value projections are scaled up so that
    attention is far from uniform and a wrong scale or token layout shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = qkv_gain if any(s in name for s in ('qkv_local', 'conv_h', 'conv_v')) else 1.0
            fan_in = max(1, p[0].numel()) if p.dim() > 1 else 1
            p.copy_(gain * torch.randn(p.shape, generator=g) * (0.5 / fan_in**0.5) + (0.3 if p.dim() == 1 else 0.0))
    return module


def _set_explicit_attention(module, flag):
    for m in module.modules():
        if isinstance(m, (IntraAxialBlock, InterAxialBlock)):
            m._explicit_attention = flag


@pytest.mark.parametrize('case', ['stage2_x16', 'stage2_x32'])
def test_state_dict_equals_official_refine_entries(case):
    with open(OFFICIAL_KEYS) as f:
        entries = json.load(f)['cases'][case]['state_dict']
    expected = [(key[len('refine.'):], shape) for key, shape, _ in entries if key.startswith('refine.')]
    assert len(expected) == 250
    with torch.device('meta'):  # structure only: no memory, no initialisation
        msrm = MSRM(ch=128, ch_mult=[1, 1, 2, 2, 4], attn_mult=[3, 3])
    got = [(key, list(value.shape)) for key, value in msrm.state_dict().items()]
    assert got == expected  # names, shapes and order
    assert all(v.dtype == torch.float32 for v in msrm.state_dict().values())


def test_registered_and_heads_follow_channels():
    assert ARCH_REGISTRY.get('MSRM') is MSRM
    with torch.device('meta'):
        msrm = MSRM(ch=128, ch_mult=[1, 1, 2, 2, 4], attn_mult=[3, 3])
    assert [b.rfb[0].num_heads for b in msrm.refine] == [4, 2]  # Level_4 (256 ch), Level_2 (128 ch)
    assert [len(b.rfb) for b in msrm.refine] == [6, 6]
    assert [type(m).__name__ for m in msrm.refine[0].rfb[:2]] == ['IntraAxialBlock', 'InterAxialBlock']


def test_too_few_channels_for_a_head_fails_clearly():
    with pytest.raises(ValueError, match=r'Level_4 branch has 32 channels'):
        MSRM(ch=32, ch_mult=[1, 1, 1], attn_mult=[1, 1])
    with pytest.raises(ValueError, match=r'num_heads=3 must divide dim/2=64'):
        IntraAxialBlock(128, 3)


@pytest.mark.parametrize('batch,height,width', [(2, 16, 16), (1, 12, 20), (1, 20, 12), (2, 4, 8)])
def test_output_shapes_per_level(batch, height, width):
    """Square and non-square inputs, including H/4 odd (12 -> 3, 20 -> 5) and a 1-pixel Level_4 row."""
    torch.manual_seed(0)
    msrm = MSRM(**SMALL).eval()
    feats = _small_feats(batch, height, width)
    with torch.no_grad():
        out = msrm(feats)
        out_channels_last = msrm({k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()})
    assert list(out) == ['Level_4', 'Level_2', 'Level_1']
    for s in (4, 2, 1):
        assert out[f'Level_{s}'].shape == (batch, 3, height // s, width // s)
        assert out[f'Level_{s}'].is_contiguous()
        assert torch.isfinite(out[f'Level_{s}']).all()
        torch.testing.assert_close(out_channels_last[f'Level_{s}'], out[f'Level_{s}'], rtol=0, atol=1e-5)


def test_generalises_to_more_branches():
    torch.manual_seed(0)
    msrm = MSRM(ch=64, ch_mult=[1, 2, 2, 4], attn_mult=[1, 0, 2]).eval()
    feats = {f'Level_{2**i}': torch.randn(1, 64 * m, 40 // 2**i, 24 // 2**i) for i, m in enumerate([1, 2, 2, 4])}
    with torch.no_grad():
        out = msrm(feats)
    assert [(k, tuple(v.shape[2:])) for k, v in out.items()] == [('Level_8', (5, 3)), ('Level_4', (10, 6)),
                                                                   ('Level_2', (20, 12)), ('Level_1', (40, 24))]


def test_missing_or_mismatched_level_fails_clearly():
    msrm = MSRM(**SMALL).eval()
    feats = _small_feats(1, 16, 16)
    with pytest.raises(KeyError, match='Level_2'):
        msrm({k: v for k, v in feats.items() if k != 'Level_2'})
    feats['Level_2'] = torch.randn(1, 64, 10, 8)
    with pytest.raises(ValueError, match=r'Level_2 \(1, 64, 10, 8\) does not match'):
        msrm(feats)


@pytest.mark.parametrize('block_cls', [IntraAxialBlock, InterAxialBlock])
@pytest.mark.parametrize('dim,heads', [(64, 1), (128, 2), (192, 3)])
@pytest.mark.parametrize('shape', [(2, 8, 8), (1, 6, 10), (2, 7, 3), (1, 1, 5)])
def test_fused_attention_equals_explicit(block_cls, dim, heads, shape):
    """SDPA on the copy-free channels-last layout == plain softmax attention on the paper's layout (fp32)."""
    block = _randomize(block_cls(dim, heads), seed=dim + heads).eval()
    x = torch.randn(shape[0], dim, *shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = block(x)
        block._explicit_attention = True
        explicit = block(x)
    assert fused.shape == x.shape
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-4)
    # the comparison is sensitive: attention is far from uniform here, and changes the output a lot
    with torch.no_grad():
        block._explicit_attention = False
        block._attention = lambda tokens: torch.zeros_like(tokens)
        no_attention = block(x)
    assert (no_attention - fused).abs().max() > 0.1


@pytest.mark.parametrize('block_cls', [IntraAxialBlock, InterAxialBlock])
def test_chunked_feed_forward_equals_whole(block_cls, monkeypatch):
    """The CPU path runs the token-wise residual MLP in chunks; values and gradients must not change."""
    block = _randomize(block_cls(64, 1))
    x = torch.randn(2, 64, 6, 10, generator=torch.Generator().manual_seed(2))
    results = []
    for chunk in (10**9, 7):  # whole, then 120 tokens in chunks of 7 (last one short)
        monkeypatch.setattr(axial_attention, 'FEED_FORWARD_CHUNK', chunk)
        block.zero_grad()
        y = block(x)
        y.square().mean().backward()
        results.append((y.detach(), [p.grad.clone() for p in block.parameters()]))
    (whole, whole_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    for g_chunked, g_whole in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(g_chunked, g_whole, rtol=1e-4, atol=1e-6)


def test_fused_msrm_equals_explicit_msrm():
    msrm = _randomize(MSRM(**SMALL)).eval()
    feats = _small_feats(2, 12, 20)
    with torch.no_grad():
        fused = msrm(feats)
        _set_explicit_attention(msrm, True)
        explicit = msrm(feats)
    for level in fused:
        torch.testing.assert_close(fused[level], explicit[level], rtol=0, atol=1e-4)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    msrm = MSRM(**SMALL).train()
    out = msrm(_small_feats(2, 12, 8))
    loss = sum(v.square().mean() for v in out.values())
    loss.backward()
    for name, p in msrm.named_parameters():
        if '.temb_proj.' in name:  # the reference's unused time-embedding projection
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gate_multiplies_the_next_finer_level():
    msrm = MSRM(**SMALL).eval()
    feats = _small_feats(1, 12, 20)
    with torch.no_grad():
        gate_convs = [branch.attn_out[1].conv for branch in msrm.refine]
        for conv in gate_convs:  # sigmoid(-1e4) = 0: the gates close
            conv.weight.zero_()
            conv.bias.fill_(-1e4)
        closed = msrm(feats)
        other = msrm({**feats, 'Level_2': torch.randn_like(feats['Level_2']),
                      'Level_1': torch.randn_like(feats['Level_1'])})
        # the finer levels now only see zeros
        torch.testing.assert_close(other['Level_2'], closed['Level_2'], rtol=0, atol=0)
        torch.testing.assert_close(other['Level_1'], closed['Level_1'], rtol=0, atol=0)
        torch.testing.assert_close(closed['Level_2'], msrm.refine[1](torch.zeros_like(feats['Level_2']))[0])
        torch.testing.assert_close(closed['Level_1'], msrm.refine_out(torch.zeros_like(feats['Level_1'])))

        for conv in gate_convs:  # sigmoid(1e4) = 1: the gates are fully open
            conv.bias.fill_(1e4)
        opened = msrm(feats)
        torch.testing.assert_close(opened['Level_2'], msrm.refine[1](feats['Level_2'])[0])
        torch.testing.assert_close(opened['Level_1'], msrm.refine_out(feats['Level_1']))
        assert (opened['Level_1'] - closed['Level_1']).abs().max() > 1e-3
        # the coarsest level has no gate in front of it
        torch.testing.assert_close(opened['Level_4'], closed['Level_4'], rtol=0, atol=0)


def test_loads_its_own_state_dict_strictly(tmp_path):
    torch.manual_seed(0)
    a = MSRM(**SMALL).eval()
    b = MSRM(**SMALL).eval()
    path = os.path.join(tmp_path, 'msrm.pth')
    torch.save(a.state_dict(), path)
    b.load_state_dict(torch.load(path, weights_only=True), strict=True)
    feats = _small_feats(1, 8, 8)
    with torch.no_grad():
        for level, value in a(feats).items():
            torch.testing.assert_close(b(feats)[level], value, rtol=0, atol=0)
