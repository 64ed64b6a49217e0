"""Rescaler: any image size, mod-crop, the 8-bit LR, tiling with blending, conversions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqir.inference import Rescaler, official_network_options
from vqir.tiling import tile_spans

from helpers import on_8bit_grid, photo, tiny_vqir

@pytest.fixture(scope='module')
def net16():
    return tiny_vqir()


def from_network(x):
    return (x + 1) / 2


# ------------------------------------------------------------------------------------------ sizes


def test_any_size_round_trips_to_its_own_size(net16):
    rescaler = Rescaler(net16, tile=0)
    hr = photo(100, 76)
    lr, outputs = rescaler.roundtrip(hr)
    assert lr.shape == (1, 3, 7, 5)  # ceil(100/16), ceil(76/16)
    assert lr.dtype == torch.float32 and on_8bit_grid(lr) and lr.min() >= 0 and lr.max() <= 1
    assert list(outputs) == ['Level_1', 'Level_2', 'Level_4']  # the decoder's own image only on request
    assert outputs['Level_1'].shape == (1, 3, 100, 76)
    assert outputs['Level_2'].shape == (1, 3, 50, 38)
    assert outputs['Level_4'].shape == (1, 3, 25, 19)
    with_sr = Rescaler(net16, tile=0, decoder_image=True).upscale(lr, out_size=(100, 76))
    assert list(with_sr) == ['Level_1', 'Level_2', 'Level_4', 'SR'] and with_sr['SR'].shape == (1, 3, 100, 76)
    assert torch.equal(with_sr['Level_1'], outputs['Level_1'])

    # the network saw the image reflect-padded at the bottom/right to 112 x 80
    padded = F.pad(hr * 2 - 1, (0, 4, 0, 12), mode='reflect')
    with torch.inference_mode():
        ref_lr = net16.downscale(padded)
        ref = net16.upscale(ref_lr)
    assert torch.equal(lr, from_network(ref_lr))
    assert torch.equal(outputs['Level_1'], from_network(ref['Level_1'])[..., :100, :76])
    assert torch.equal(outputs['Level_4'], from_network(ref['Level_4'])[..., :25, :19])


def test_whole_image_equals_the_network_exactly(net16):
    """Without padding or tiles, the Rescaler is the network plus the [0,1] <-> [-1,1] mapping."""
    hr = photo(64, 48)
    lr = Rescaler(net16).downscale(hr)
    outputs = Rescaler(net16).upscale(lr)
    with torch.inference_mode():
        ref = net16(hr * 2 - 1, is_train=False)
    assert torch.equal(lr, from_network(ref['LR']))
    for name in ('Level_1', 'Level_2', 'Level_4'):
        assert torch.equal(outputs[name], from_network(ref[name])), name
    # an 8-bit file of the LR, read back and normalised as the reference's readers do, is the network's LR
    stored = torch.from_numpy(np.round(lr.numpy() * 255).astype(np.uint8)).float() / 255.
    assert torch.equal((stored - 0.5) / 0.5, ref['LR'])


def test_mod_crop_crops_like_the_reference(net16):
    rescaler = Rescaler(net16, size_mode='mod_crop')
    hr = photo(100, 76)
    lr, outputs = rescaler.roundtrip(hr)
    assert lr.shape == (1, 3, 6, 4)
    assert outputs['Level_1'].shape == (1, 3, 96, 64) and outputs['Level_4'].shape == (1, 3, 24, 16)
    with torch.inference_mode():
        ref_lr = net16.downscale(hr[..., :96, :64] * 2 - 1)
    assert torch.equal(lr, from_network(ref_lr))


def test_32x_any_size():
    rescaler = Rescaler(tiny_vqir(ir_scale=32), tile=0)
    lr, outputs = rescaler.roundtrip(photo(100, 76))
    assert lr.shape == (1, 3, 4, 3) and on_8bit_grid(lr)
    assert outputs['Level_1'].shape == (1, 3, 100, 76) and outputs['Level_2'].shape == (1, 3, 50, 38)


def test_too_small_and_wrong_sizes_are_clear_errors(net16):
    rescaler = Rescaler(net16)
    with pytest.raises(ValueError, match=r'40x15 pixels; at 16x rescaling both sides must be at least 16'):
        rescaler.downscale(torch.rand(1, 3, 15, 40))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        rescaler.downscale(torch.rand(3, 32, 32))
    lr = torch.rand(1, 3, 7, 5)
    with pytest.raises(ValueError, match=r'output size 76x120 does not fit an LR of 5x7 at 16x'):
        rescaler.upscale(lr, out_size=(120, 76))


def test_invalid_settings_are_refused(net16):
    with pytest.raises(ValueError, match='multiple of ir_scale 16'):
        Rescaler(net16, tile=100)
    with pytest.raises(ValueError, match='multiple of 16'):
        Rescaler(net16, tile_overlap=8)
    with pytest.raises(ValueError, match='needs a CUDA device'):
        Rescaler(net16, half=True, device='cpu')
    with pytest.raises(ValueError, match='does not match the network'):
        Rescaler(net16, ir_scale=32)
    with pytest.raises(ValueError, match="size_mode must be 'pad' or 'mod_crop'"):
        Rescaler(net16, size_mode='crop')


def test_stage1_bgr_network_and_training_flag():
    net = tiny_vqir(stage=1)
    net.train()
    hr = photo(32, 48)
    rgb, bgr = Rescaler(net, network_color='rgb'), Rescaler(net, network_color='bgr')
    outputs = bgr.upscale(bgr.downscale(hr))
    assert list(outputs) == ['SR'] and outputs['SR'].shape == (1, 3, 32, 48)
    assert net.training  # the caller's mode is restored
    # a BGR network sees the channels reversed on the way in, and its outputs are reversed back
    assert torch.equal(bgr.downscale(hr), rgb.downscale(hr.flip(1)).flip(1))
    lr = rgb.downscale(hr)
    assert torch.equal(bgr.upscale(lr)['SR'], rgb.upscale(lr.flip(1))['SR'].flip(1))


def test_each_direction_runs_only_its_half(net16):
    def forbidden(module, args):
        raise AssertionError(f'{type(module).__name__} must not run here')

    rescaler = Rescaler(net16)
    hr = photo(32, 32)
    hooks = [part.register_forward_pre_hook(forbidden) for part in (net16.decoder, net16.post_quant_conv, net16.refine)]
    try:
        lr = rescaler.downscale(hr)
    finally:
        for hook in hooks:
            hook.remove()
    hooks = [part.register_forward_pre_hook(forbidden) for part in (net16.encoder, net16.quant_conv)]
    try:
        outputs = rescaler.upscale(lr)
    finally:
        for hook in hooks:
            hook.remove()
    assert outputs['Level_1'].shape == (1, 3, 32, 32) and outputs['Level_1'].is_inference()


def test_bf16_autocast_on_cpu_keeps_the_lr_on_the_8bit_grid(net16):
    hr = photo(64, 48)
    lr = Rescaler(net16, bf16=True).downscale(hr)
    assert on_8bit_grid(lr) and lr.dtype == torch.float32
    outputs = Rescaler(net16, bf16=True).upscale(lr)
    assert outputs['Level_1'].dtype == torch.float32 and torch.isfinite(outputs['Level_1']).all()


def test_official_network_options():
    opt = official_network_options(32)
    assert opt['ir_scale'] == 32 and opt['stage'] == 2 and opt['ch_mult'] == [1, 1, 2, 2, 4]
    assert 'attn_mult' not in official_network_options(16, stage=1)


# ------------------------------------------------------------------------------------------ tiling


def test_tile_spans_are_even_aligned_and_cover():
    spans = tile_spans(208, 64, 16)
    assert spans == [(0, 48), (48, 96), (96, 144), (144, 208)]
    assert tile_spans(64, 64, 16) == [(0, 64)]
    assert tile_spans(100 * 32, 512, 32)[-1][1] == 3200


class _LocalQuantize(nn.Module):
    def forward(self, z):
        return z, z.new_zeros(()), None


class _LocalIFRM(nn.Module):
    def __init__(self):
        super().__init__()
        self.fwd, self.rev = nn.Conv2d(8, 3, 1), nn.Conv2d(3, 8, 1)

    def forward(self, x, rev=False):
        return self.rev(x) if rev else torch.tanh(self.fwd(x))


class _LocalDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z, return_feat=False, image=True):
        feats, h = {}, z
        for conv, (factor, level) in zip(self.convs, ((4, 4), (2, 2), (2, 1))):
            h = torch.relu(conv(F.interpolate(h, scale_factor=factor, mode='nearest')))
            feats[f'Level_{level}'] = h
        return (self.out(h) if image else None), feats


class _LocalRefine(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({f'Level_{k}': nn.Conv2d(8, 3, 3, padding=1) for k in (1, 2, 4)})

    def forward(self, feats):
        return {name: head(feats[name]) for name, head in self.heads.items()}


class LocalVQIR(nn.Module):
    """The VQIR interface with purely local parts: every output pixel depends on inputs at most
    14 HR pixels away (16 for the encoder's blocks), so tiles with 32 pixels of context, whose
    outer 16 are discarded, must reproduce the whole-image result up to float rounding."""
    stage, ir_scale = 2, 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(16))
        self.quant_conv = nn.Conv2d(8, 8, 1)
        self.quantize = _LocalQuantize()
        self.icrm = _LocalIFRM()
        self.post_quant_conv = nn.Conv2d(8, 8, 1)
        self.decoder = _LocalDecoder()
        self.refine = _LocalRefine()


def test_tiling_machinery_is_exact_for_a_local_network():
    net = LocalVQIR()
    hr = photo(112, 90)  # padded to 112 x 96; 4 x 3 tiles of at most 32 pixels
    whole = Rescaler(net, tile=0)
    tiled = Rescaler(net, tile=32, tile_overlap=32)
    assert len(tiled._tiles(112, 96)) == 12
    lr_whole, lr_tiled = whole.downscale(hr), tiled.downscale(hr)
    assert torch.equal(lr_whole, lr_tiled)
    out_whole, out_tiled = whole.upscale(lr_whole, out_size=(112, 90)), tiled.upscale(lr_whole, out_size=(112, 90))
    for name in out_whole:
        diff = (out_whole[name] - out_tiled[name]).abs().max().item()
        assert out_tiled[name].shape == out_whole[name].shape
        assert diff < 1e-5, (name, diff)
    # automatic tiling above auto_tile_pixels runs the same machinery
    auto = Rescaler(net, tile_overlap=32, auto_tile_pixels=64 * 64)
    assert len(auto._tiles(112, 96)) > 1 and len(auto._tiles(48, 48)) == 1
    assert (auto.upscale(lr_whole)['Level_1'] - whole.upscale(lr_whole)['Level_1']).abs().max() < 1e-5


def _jumps(img, dim):
    """Mean absolute difference between neighbouring rows (dim=2) or columns (dim=3): one value
    per boundary, index i for the boundary between i and i + 1."""
    diff = (img.narrow(dim, 1, img.shape[dim] - 1) - img.narrow(dim, 0, img.shape[dim] - 1)).abs()
    return diff.mean(dim=[d for d in range(img.dim()) if d != dim])


class _GlobalRefine(_LocalRefine):
    """Adds each feature map's spatial mean: a per-tile offset, like the global statistics
    (GroupNorm, attention) of the real network, which a hard cut between tiles turns into a seam."""

    def forward(self, feats):
        return {name: head(feats[name]) + 100 * feats[name].mean(dim=(2, 3), keepdim=True)[:, :3]
                for name, head in self.heads.items()}


def test_blending_removes_the_seam_of_per_tile_statistics():
    net = LocalVQIR()
    net.refine = _GlobalRefine()
    hr = photo(128, 64)
    whole = Rescaler(net, tile=0)
    lr = whole.downscale(hr)
    reference = whole.upscale(lr)['Level_1']
    hard_cut = Rescaler(net, tile=64, tile_overlap=0).upscale(lr)['Level_1'] - reference
    blended = Rescaler(net, tile=64, tile_overlap=32).upscale(lr)['Level_1'] - reference
    # the tiles meet between rows 63 and 64; a hard cut also shows the tiles' zero padding there
    hard_jumps = _jumps(hard_cut, 2)
    seam = hard_jumps[48:80].max()
    elsewhere = torch.cat([hard_jumps[:48], hard_jumps[80:]])
    assert seam > 1000 * elsewhere.max()  # a seam without blending, and the tiles are exact elsewhere
    # blended: the same difference spread over the 32-row band by the raised cosine, whose
    # steepest step is pi/2 / 32 ~ 5 % of the offset
    steepest = _jumps(blended, 2).max()
    print(f'\nper-tile offset: seam of {seam.item():.5f} with a hard cut, steepest step {steepest.item():.5f} blended')
    assert steepest < 0.1 * seam


def test_tiled_vs_whole_image_on_a_global_network(net16):
    """The real VQIR is not local: its VQGAN has a receptive field of well over 100 pixels,
    global attention at the lowest level and GroupNorm over the whole input; the MSRM attends
    along whole rows and columns. So tiles cannot reproduce the whole image exactly, and a
    random-weight network exaggerates this (its features depend strongly on distant pixels).
    What must hold: the LR stays on the 8-bit grid and nearly equal, sizes are exact, context
    and blending bring the result closer to the whole image than naive tiling (no context, a
    hard cut), and there is no seam at the tile boundaries."""
    hr = photo(256, 192)
    whole = Rescaler(net16, tile=0)
    tiled = Rescaler(net16, tile=128, tile_overlap=32)  # 2 x 2 tiles, cores 128 x 96
    assert len(tiled._tiles(256, 192)) == 4

    lr_whole, lr_tiled = whole.downscale(hr), tiled.downscale(hr)
    assert lr_tiled.shape == (1, 3, 16, 12) and on_8bit_grid(lr_tiled)
    lr_levels = ((lr_whole - lr_tiled) * 255).abs()
    print(f'\nLR tiled vs whole: max {lr_levels.max().item():.0f} level(s), '
          f'{(lr_levels > 0).float().mean().item() * 100:.1f}% of the values differ')
    # slightly different encoder features move a few values across a rounding threshold
    assert lr_levels.max() <= 1 and (lr_levels > 0).float().mean() < 0.1

    reference = whole.upscale(lr_whole)
    blended = tiled.upscale(lr_whole)
    naive = Rescaler(net16, tile=128, tile_overlap=0).upscale(lr_whole)
    for name in reference:
        diff = (blended[name] - reference[name]).abs()
        naive_diff = (naive[name] - reference[name]).abs()
        print(f'{name} tiled vs whole: max {diff.max().item():.3f}, mean {diff.mean().item():.4f} '
              f'(naive tiling: max {naive_diff.max().item():.3f}, mean {naive_diff.mean().item():.4f})')
        assert blended[name].shape == reference[name].shape
        assert diff.mean() < naive_diff.mean(), name
    level1 = (blended['Level_1'] - reference['Level_1']).abs()
    assert level1.max() < (naive['Level_1'] - reference['Level_1']).abs().max()

    # no seam: the step between neighbouring rows/columns at the tile boundaries (row 128,
    # column 96) is no larger than the steps elsewhere in the same image
    for dim, boundary in ((2, 128), (3, 96)):
        jumps = _jumps(blended['Level_1'], dim)
        elsewhere = torch.cat([jumps[:boundary - 1], jumps[boundary:]])
        print(f'step across the tile boundary (dim {dim}): {jumps[boundary - 1].item():.4f}; elsewhere: median '
              f'{elsewhere.median().item():.4f}, max {elsewhere.max().item():.4f}')
        assert jumps[boundary - 1] <= elsewhere.max()


def test_compiled_parts_give_the_same_outputs(net16):
    hr = photo(64, 48)
    lr, outputs = Rescaler(net16, tile=0).roundtrip(hr)
    # aot_eager captures the graphs as inductor would, without generating code (seconds, not minutes)
    compiled = Rescaler(net16, tile=0, compile='aot_eager')
    for part in (compiled._encoder, compiled._decoder, compiled._refine):
        assert isinstance(part, torch._dynamo.eval_frame.OptimizedModule)
    lr_compiled, outputs_compiled = compiled.roundtrip(hr)
    assert torch.equal(lr_compiled, lr)
    for key, value in outputs.items():
        assert (outputs_compiled[key] - value).abs().max() <= 1e-5, key
    # the compiled parts share the network's weights
    assert compiled._decoder._orig_mod is net16.decoder
    with pytest.raises(ValueError, match='compile must be'):
        Rescaler(net16, compile=1)


def test_a_colour_path_runs_in_whole_images_and_tiles():
    """A prior with VQGAN's ``colour_path``: the Rescaler adds the block means to the encoder's output
    and puts every image on the codes' colours, as VQIR does; the path is local (16x16 block means
    in, bicubic upsampling out, two LR pixels of context), so tiles with 64 pixels of context give
    the whole image's result."""
    from vqir.archs.lr_quantizer import quantize_lr
    from vqir.archs.vqgan_arch import BlockColourPath
    hr = photo(112, 90)  # padded to 112 x 96
    net = LocalVQIR()
    torch.manual_seed(2)
    net.colour_path = BlockColourPath(3, 8, 16)
    whole = Rescaler(net, tile=0, decoder_image=True)
    lr, outs = whole.roundtrip(hr)
    x = F.pad(hr * 2 - 1, (0, 6, 0, 0), mode='reflect')
    with torch.no_grad():
        feat = net.quant_conv(net.encoder(x)) + net.colour_path.encode(x)
        torch.testing.assert_close(lr, from_network(quantize_lr(net.icrm(feat), noise=False)), atol=1e-6, rtol=0)
        codes = net.icrm(lr * 2 - 1, rev=True)  # LocalVQIR's quantiser is the identity
        without = Rescaler(LocalVQIR(), tile=0, decoder_image=True).upscale(lr, out_size=(112, 90))
    for name, out in outs.items():
        k = 1 if name == 'SR' else int(name.split('_')[1])
        base = net.colour_path.decode(codes, size=(112 // k, 96 // k))[..., :out.shape[-2], :out.shape[-1]]
        torch.testing.assert_close(out, without[name] + base / 2, atol=1e-5, rtol=0, msg=name)  # [0, 1] units
    tiled = Rescaler(net, tile=32, tile_overlap=64, decoder_image=True)
    assert torch.equal(tiled.downscale(hr), lr)
    for name, out in tiled.upscale(lr, out_size=(112, 90)).items():
        assert (out - outs[name]).abs().max() < 1e-5, name


@pytest.mark.parametrize('refine_residual', [False, True])
def test_a_network_with_a_colour_path_equals_itself_through_the_rescaler(refine_residual):
    """The Rescaler builds the images as VQIR does with ``colour_path`` (and ``refine_residual``, with and
    without the decoder's image among its outputs)."""
    from basicsr.utils.registry import ARCH_REGISTRY

    from helpers import TINY_VQIR
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get('VQIR')(stage=2, ir_scale=16, **TINY_VQIR, attn_mult=[1, 1], colour_path=True,
                                    refine_residual=refine_residual).eval()
    with torch.no_grad():
        for p in net.refine.parameters():  # a residual MSRM starts at zero: give it something to add
            p.add_(torch.randn_like(p) * 0.02)
    hr = photo(64, 48)
    lr, outputs = Rescaler(net, decoder_image=True).roundtrip(hr)
    without_sr = Rescaler(net).upscale(lr)
    assert list(without_sr) == ['Level_1', 'Level_2', 'Level_4']
    for name, out in without_sr.items():
        torch.testing.assert_close(out, outputs[name], atol=1e-6, rtol=0, msg=name)
    with torch.inference_mode():
        ref = net(hr * 2 - 1, is_train=False)
        ref_sr = net.upscale(ref['LR'])['SR']
    torch.testing.assert_close(lr, from_network(ref['LR']), atol=1e-6, rtol=0)
    for name in ('Level_1', 'Level_2', 'Level_4'):
        torch.testing.assert_close(outputs[name], from_network(ref[name]), atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(outputs['SR'], from_network(ref_sr), atol=1e-6, rtol=0)
