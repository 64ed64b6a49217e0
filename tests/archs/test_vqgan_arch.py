"""VQGAN architecture: taming-compatible layout, quantiser, attention, decoder features, a tiny overfit."""
import json
import logging
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.archs import build_network

from helpers import FIXTURES, basicsr_log_records

from vqir.archs.vqgan_arch import (VQGAN, AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, Upsample,
                                   VectorQuantizer)

KEYS_JSON = os.path.join(FIXTURES, 'reference', 'taming_vqgan_keys.json')
F16_1024 = dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256, n_embed=1024, embed_dim=256)
TINY = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=16, n_embed=64, embed_dim=8)


def _layout(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def _taming_layout(ch, ch_mult, num_res_blocks, z_channels, n_embed, embed_dim, attn_resolutions, resolution,
                   in_channels=3, out_channels=3):
    """Ordered (key, shape) of taming's VQModel, written out from taming's construction rules
    (taming/modules/diffusionmodules/model.py Encoder/Decoder, quantize.py VectorQuantizer2)."""
    keys = []

    def conv(name, cin, cout, k):
        keys.extend([(f'{name}.weight', (cout, cin, k, k)), (f'{name}.bias', (cout, ))])

    def norm(name, c):
        keys.extend([(f'{name}.weight', (c, )), (f'{name}.bias', (c, ))])

    def resblock(name, cin, cout):
        norm(f'{name}.norm1', cin)
        conv(f'{name}.conv1', cin, cout, 3)
        norm(f'{name}.norm2', cout)
        conv(f'{name}.conv2', cout, cout, 3)
        if cin != cout:
            conv(f'{name}.nin_shortcut', cin, cout, 1)

    def attn(name, c):
        norm(f'{name}.norm', c)
        for part in ('q', 'k', 'v', 'proj_out'):
            conv(f'{name}.{part}', c, c, 1)

    levels = len(ch_mult)
    in_ch_mult = (1, ) + tuple(ch_mult)
    # encoder
    conv('encoder.conv_in', in_channels, ch, 3)
    curr_res = resolution
    for i in range(levels):
        block_in, block_out = ch * in_ch_mult[i], ch * ch_mult[i]
        # taming registers a level's blocks, then its attns, then its downsample
        for b in range(num_res_blocks):
            resblock(f'encoder.down.{i}.block.{b}', block_in, block_out)
            block_in = block_out
        if curr_res in attn_resolutions:
            for b in range(num_res_blocks):
                attn(f'encoder.down.{i}.attn.{b}', block_out)
        if i != levels - 1:
            conv(f'encoder.down.{i}.downsample.conv', block_out, block_out, 3)
            curr_res //= 2
    resblock('encoder.mid.block_1', block_in, block_in)
    attn('encoder.mid.attn_1', block_in)
    resblock('encoder.mid.block_2', block_in, block_in)
    norm('encoder.norm_out', block_in)
    conv('encoder.conv_out', block_in, z_channels, 3)
    # decoder: built from the lowest level up, but registered in level order 0..L-1
    block_in = ch * ch_mult[-1]
    conv('decoder.conv_in', z_channels, block_in, 3)
    resblock('decoder.mid.block_1', block_in, block_in)
    attn('decoder.mid.attn_1', block_in)
    resblock('decoder.mid.block_2', block_in, block_in)
    curr_res = resolution // 2**(levels - 1)
    per_level = {}
    for i in reversed(range(levels)):
        entries, block_out = [], ch * ch_mult[i]
        saved, keys[:] = keys[:], []
        for b in range(num_res_blocks + 1):
            resblock(f'decoder.up.{i}.block.{b}', block_in, block_out)
            block_in = block_out
        if curr_res in attn_resolutions:
            for b in range(num_res_blocks + 1):
                attn(f'decoder.up.{i}.attn.{b}', block_out)
        if i != 0:
            conv(f'decoder.up.{i}.upsample.conv', block_out, block_out, 3)
            curr_res *= 2
        entries, keys[:] = keys[:], saved
        per_level[i] = entries
    for i in range(levels):
        keys.extend(per_level[i])
    norm('decoder.norm_out', block_in)
    conv('decoder.conv_out', block_in, out_channels, 3)
    keys.append(('quantize.embedding.weight', (n_embed, embed_dim)))
    conv('quant_conv', z_channels, embed_dim, 1)
    conv('post_quant_conv', embed_dim, z_channels, 1)
    return keys


def test_f16_1024_state_dict_equals_reference_keys():
    with open(KEYS_JSON, encoding='utf-8') as f:
        reference = json.load(f)
    with torch.device('meta'):
        net = VQGAN(**F16_1024)
    ours = [[k, list(v.shape), str(v.dtype).replace('torch.', '')] for k, v in net.state_dict().items()]
    assert ours == reference['state_dict']  # names, shapes, dtypes and order
    assert sum(p.numel() for p in net.parameters()) == reference['total_elements'] == 72141699
    # the default (hard-coded) attention layout is taming's f16 rule: attn_resolutions [16] at 256
    assert ours == [[k, list(s), 'float32'] for k, s in _taming_layout(**F16_1024, attn_resolutions=[16],
                                                                       resolution=256)]
    with torch.device('meta'):
        explicit = VQGAN(**F16_1024, attn_resolutions=[16], resolution=256)
    assert _layout(explicit) == _layout(net)


def test_attn_resolutions_follow_taming_rule():
    cfg = dict(ch=32, ch_mult=[1, 2, 2, 4], num_res_blocks=1, z_channels=64, n_embed=128, embed_dim=64)
    with torch.device('meta'):
        net = VQGAN(**cfg, attn_resolutions=[16, 32], resolution=64)
    assert _layout(net) == _taming_layout(**cfg, attn_resolutions=[16, 32], resolution=64)
    q_keys = [k for k, _ in _layout(net) if k.endswith('.q.weight')]
    assert q_keys == [
        'encoder.down.1.attn.0.q.weight', 'encoder.down.2.attn.0.q.weight', 'encoder.mid.attn_1.q.weight',
        'decoder.mid.attn_1.q.weight', 'decoder.up.1.attn.0.q.weight', 'decoder.up.1.attn.1.q.weight',
        'decoder.up.2.attn.0.q.weight', 'decoder.up.2.attn.1.q.weight'
    ]
    with pytest.raises(ValueError, match='together'):
        VQGAN(**cfg, attn_resolutions=[16])


def test_blocks_names_and_shapes():
    block = ResnetBlock(128, 256, temb_channels=512)
    assert [k for k, _ in _layout(block)] == [
        'norm1.weight', 'norm1.bias', 'conv1.weight', 'conv1.bias', 'temb_proj.weight', 'temb_proj.bias',
        'norm2.weight', 'norm2.bias', 'conv2.weight', 'conv2.bias', 'nin_shortcut.weight', 'nin_shortcut.bias'
    ]
    assert dict(_layout(block))['temb_proj.weight'] == (256, 512)
    x = torch.randn(2, 128, 6, 5)
    assert block(x).shape == (2, 256, 6, 5)
    assert block(x, torch.randn(2, 512)).shape == (2, 256, 6, 5)
    assert not hasattr(ResnetBlock(64), 'temb_proj') and not hasattr(ResnetBlock(64), 'nin_shortcut')

    down, up = Downsample(32), Upsample(32)
    y = torch.randn(1, 32, 8, 6)
    assert down(y).shape == (1, 32, 4, 3) and up(y).shape == (1, 32, 16, 12)
    # taming's asymmetric padding: zeros only after the last row and column
    expected = F.conv2d(F.pad(y, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.equal(down(y), expected)
    assert torch.allclose(Downsample(32, with_conv=False)(y), F.avg_pool2d(y, 2))


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_subpixel_upsample_conv_equals_interpolate_then_conv(memory_format):
    """The phase-wise 2x2 convs give the 3x3 conv of the nearest-upsampled map, values and gradients."""
    torch.manual_seed(0)
    up = Upsample(32)
    torch.nn.init.normal_(up.conv.bias, std=0.5)
    x = torch.randn(2, 32, 7, 5).contiguous(memory_format=memory_format).requires_grad_()
    fast = up(x)
    textbook = F.conv2d(F.interpolate(x, scale_factor=2.0, mode='nearest'), up.conv.weight, up.conv.bias, padding=1)
    assert fast.shape == (2, 32, 14, 10)
    assert (fast - textbook).abs().max().item() < 1e-5
    assert (up._forward_upsampled(x) - textbook).abs().max().item() == 0
    probe = torch.randn_like(textbook)
    grads_fast = torch.autograd.grad((fast * probe).sum(), [x, up.conv.weight, up.conv.bias])
    grads_textbook = torch.autograd.grad((textbook * probe).sum(), [x, up.conv.weight, up.conv.bias])
    for fast_grad, textbook_grad in zip(grads_fast, grads_textbook):
        assert (fast_grad - textbook_grad).abs().max().item() < 1e-4 * textbook_grad.abs().max().item()
    with torch.inference_mode():
        assert (up(x.detach()) - textbook).abs().max().item() < 1e-5


def test_resnet_block_in_place_inference_equals_autograd_path():
    torch.manual_seed(0)
    for block in (ResnetBlock(64), ResnetBlock(64, 128)):
        x = torch.randn(2, block.in_channels, 6, 5)
        with_grad = block(x)
        with torch.no_grad():
            x_before = x.clone()
            in_place = block(x)
        assert torch.equal(x, x_before)  # the input is never overwritten
        assert (in_place - with_grad).abs().max().item() < 1e-6


def test_sdpa_attention_equals_explicit_path():
    torch.manual_seed(0)
    block = AttnBlock(64)
    for conv in (block.q, block.k, block.v, block.proj_out):  # larger logits than the default init gives
        torch.nn.init.normal_(conv.weight, std=0.2)
        torch.nn.init.normal_(conv.bias, std=0.2)
    x = torch.randn(2, 64, 7, 9, requires_grad=True)
    fused = block(x)
    explicit = block._forward_explicit(x)
    assert fused.shape == x.shape
    assert (fused - explicit).abs().max().item() < 1e-4
    grad_fused, = torch.autograd.grad(fused.square().sum(), x)
    grad_explicit, = torch.autograd.grad(explicit.square().sum(), x)
    scale = grad_explicit.abs().max().item()
    assert (grad_fused - grad_explicit).abs().max().item() < 1e-4 * scale
    # the residual branch is not trivial, so the comparison above is meaningful
    assert (fused - x).abs().max().item() > 0.1


def test_tiny_vqgan_api_and_shapes():
    torch.manual_seed(0)
    net = VQGAN(**TINY).eval()
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        quant, emb_loss, (perplexity, min_encodings, indices) = net.encode(x)
        assert quant.shape == (2, 8, 8, 12)
        assert emb_loss.shape == () and perplexity.shape == () and min_encodings is None
        assert indices.shape == (2 * 8 * 12, ) and indices.dtype == torch.long
        assert 1.0 <= perplexity.item() <= 64
        rec = net.decode(quant)
        assert rec.shape == x.shape
        # quant is z + (z_q - z) (straight-through), equal to the looked-up codes up to rounding
        rec_code = net.decode_code(indices, (2, 8, 12, 8))
        assert torch.allclose(rec_code, rec, atol=1e-5)
        assert torch.equal(net.decode_code(indices.view(2, 8, 12)), rec_code)
        out, loss = net(x)
        assert torch.equal(out, rec) and torch.equal(loss, emb_loss)
        out_f, loss_f, feats = net(x, return_feat=True)
        assert torch.equal(out_f, rec)
        assert {k: tuple(v.shape) for k, v in feats.items()} == {
            'Level_4': (2, 64, 8, 12),
            'Level_2': (2, 32, 16, 24),
            'Level_1': (2, 32, 32, 48)
        }
    assert net.get_last_layer() is net.decoder.conv_out.weight
    sane = VQGAN(**TINY, sane_index_shape=True)
    assert sane.encode(x)[2][2].shape == (2, 8, 12)
    # registered and buildable from an options dict
    built = build_network({'type': 'VQGAN', **TINY})
    assert isinstance(built, VQGAN)


def test_decoder_level_features_f16():
    torch.manual_seed(0)
    decoder = Decoder(ch=128, out_channels=3, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256).eval()
    z = torch.randn(1, 256, 2, 3)
    with torch.no_grad():
        image, feats = decoder(z, return_feat=True)
        assert torch.equal(image, decoder(z))
    assert list(feats) == ['Level_16', 'Level_8', 'Level_4', 'Level_2', 'Level_1']
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        'Level_16': (1, 512, 2, 3),
        'Level_8': (1, 256, 4, 6),
        'Level_4': (1, 256, 8, 12),
        'Level_2': (1, 128, 16, 24),
        'Level_1': (1, 128, 32, 48)
    }
    # Level_1 is the last feature map before the output head
    with torch.no_grad():
        head = decoder.conv_out(F.silu(decoder.norm_out(feats['Level_1'])))
        no_image, same_feats = decoder(z, return_feat=True, image=False)
    assert torch.equal(head, image)
    assert no_image is None and all(torch.equal(same_feats[k], feats[k]) for k in feats)


def test_encoder_double_z():
    enc = Encoder(ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=3, z_channels=4, double_z=True)
    assert enc(torch.randn(1, 3, 8, 8)).shape == (1, 8, 4, 4)


def test_quantizer_picks_nearest_code_and_beta_placement():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(n_e=50, e_dim=6, beta=0.25)
    torch.nn.init.normal_(quantizer.embedding.weight)
    z = torch.randn(3, 6, 5, 4, requires_grad=True)
    z_q, loss, (_, _, indices) = quantizer(z)

    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    brute = torch.cdist(flat.double(), quantizer.embedding.weight.detach().double()).argmin(dim=1)
    assert torch.equal(indices, brute)
    codes = quantizer.embedding.weight.detach()[brute].view(3, 5, 4, 6).permute(0, 3, 1, 2)
    assert torch.allclose(z_q, codes, atol=1e-6)
    mse = (codes - z.detach()).square().mean()
    assert torch.allclose(loss, 1.25 * mse)

    # legacy placement: weight 1 on the commitment term (to z), beta on the codebook term
    z_grad, emb_grad = torch.autograd.grad(loss, [z, quantizer.embedding.weight])
    assert torch.allclose(z_grad, 2 * (z.detach() - codes) / z.numel(), atol=1e-7)
    quantizer.legacy = False
    _, loss_fixed, _ = quantizer(z)
    z_grad_fixed, emb_grad_fixed = torch.autograd.grad(loss_fixed, [z, quantizer.embedding.weight])
    assert torch.allclose(z_grad_fixed, 0.25 * z_grad, atol=1e-8)
    assert torch.allclose(emb_grad, 0.25 * emb_grad_fixed, atol=1e-8)


def test_quantizer_distances_stay_float32_under_autocast():
    # close codes far from the origin: in bfloat16 nearly every position would get a wrong code
    torch.manual_seed(0)
    quantizer = VectorQuantizer(256, 32)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.randn(256, 32) * 0.05 + 1.0)
    z = torch.randn(2, 32, 8, 8) * 0.05 + 1.0
    flat = z.permute(0, 2, 3, 1).reshape(-1, 32).double()
    brute = torch.cdist(flat, quantizer.embedding.weight.detach().double()).argmin(dim=1)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        _, _, (_, _, indices) = quantizer(z)
    assert torch.equal(indices, brute)


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4)
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    z_q, _, _ = quantizer(z)
    upstream = torch.randn_like(z_q)
    grad, = torch.autograd.grad((z_q * upstream).sum(), z)
    assert torch.equal(grad, upstream)  # identity gradient through the quantiser

    net = VQGAN(**TINY)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    rec, _ = net(x)
    F.l1_loss(rec, x).backward()  # reconstruction only: the encoder learns through the straight-through path
    grad = net.encoder.conv_in.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_quantizer_remap(tmp_path):
    torch.manual_seed(0)
    used = np.array([3, 7, 11, 20], dtype=np.int64)
    np.save(tmp_path / 'used.npy', used)
    quantizer = VectorQuantizer(32, 4, remap=str(tmp_path / 'used.npy'), unknown_index='extra', sane_index_shape=True)
    codebook = quantizer.embedding.weight.detach()
    # inputs exactly at used codes 7 and 20 and at an unused code 5
    z = torch.stack([codebook[7], codebook[20], codebook[5]], dim=1).view(1, 4, 1, 3)
    z_q, _, (_, _, indices) = quantizer(z)
    assert indices.tolist() == [[[1, 3, 4]]]  # positions in `used`; 4 = the extra 'unknown' index
    back = quantizer.get_codebook_entry(indices[:, :, :2].reshape(-1), (1, 1, 2, 4))
    assert torch.allclose(back, z[:, :, :, :2])


def test_quantizer_remap_file_errors_name_the_file(tmp_path):
    """A missing or unusable remap file is a ValueError naming it (entry points print it as one line)."""
    np.save(tmp_path / 'objects.npy', np.array([{'a': 1}], dtype=object))  # a pickle inside: never loaded
    np.save(tmp_path / 'out_of_range.npy', np.array([3, 40]))
    for name, reason in (('missing.npy', 'No such file or directory'), ('objects.npy', 'allow_pickle=False'),
                         ('out_of_range.npy', 'expected code indices in [0, 32)')):
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=f'^remap file {re.escape(path)}: .*{re.escape(reason)}'):
            VectorQuantizer(32, 4, remap=path)


def test_tiny_vqgan_overfits_one_image():
    """Plain Adam on L1 + codebook loss: the loss on one 32x32 photo falls more than 3x in 60 steps."""
    from skimage import data
    from skimage.transform import resize

    torch.manual_seed(0)
    image = resize(data.astronaut()[100:300, 150:350], (32, 32), anti_aliasing=True)  # float in [0, 1]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().unsqueeze(0) * 2 - 1
    net = VQGAN(**TINY)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        rec, codebook_loss = net(x)
        loss = F.l1_loss(rec, x) + codebook_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first / 3, f'loss {first:.4f} -> {last:.4f}'



def _basicsr_warnings(build):
    """The warnings basicsr's logger receives while ``build()`` runs, joined."""
    with basicsr_log_records() as records:
        build()
    return ' '.join(r.getMessage() for r in records if r.levelno >= logging.WARNING)


def test_norm_groups_option_lets_colour_through_the_last_norm():
    """With one channel a group, a GroupNorm erases every channel's mean (its output means equal its
    biases, whatever the input): the decoder's last one would cut the image's colour off. With 4
    channels a group, channel means relative to their group's survive."""
    from vqir.archs.vqgan_arch import Normalize
    torch.manual_seed(0)
    h = torch.randn(2, 32, 16, 16) + 3 * torch.randn(2, 32, 1, 1)  # two inputs with their own channel means
    for groups in (32, 8):
        norm = Normalize(32, groups)
        with torch.no_grad():
            norm.bias.normal_()
            means = norm(h).mean(dim=(2, 3))
        if groups == 32:
            torch.testing.assert_close(means[0], norm.bias, atol=1e-4, rtol=0)
            torch.testing.assert_close(means[1], norm.bias, atol=1e-4, rtol=0)
        else:
            assert (means[0] - means[1]).abs().max() > 0.5
    net = VQGAN(**dict(TINY, norm_groups=8))
    assert {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    # the default is taming's layout (32 groups), and a single-channel-group network is reported
    assert all(m.num_groups == 32 for m in VQGAN(**TINY).modules() if isinstance(m, torch.nn.GroupNorm))
    warned = _basicsr_warnings(lambda: VQGAN(**TINY))
    assert 'one channel a group' in warned and 'norm_groups: 8' in warned
    assert 'one channel a group' not in _basicsr_warnings(lambda: VQGAN(**dict(TINY, norm_groups=8)))
    with pytest.raises(ValueError, match='32 channels cannot be split into 5 groups'):
        VQGAN(**dict(TINY, norm_groups=5))


def test_norm_out_groups_sets_only_the_decoders_output_norm():
    """One group in the decoder's last GroupNorm keeps colour that groups of 4 erase: channel means
    that are equal inside each group of 4 but differ between groups (a colour shared by the group's
    channels) are removed by 8 groups and kept by 1. Only ``decoder.norm_out`` changes, and the
    parameters are the same, so weights load either way."""
    from vqir.archs.vqgan_arch import Normalize
    torch.manual_seed(0)
    offsets = [3 * torch.randn(8).repeat_interleave(4).view(1, 32, 1, 1) for _ in range(2)]
    h = torch.randn(1, 32, 16, 16) + torch.cat(offsets)  # one pattern under two sets of per-group means
    means = {groups: Normalize(32, groups)(h).mean(dim=(2, 3)).detach() for groups in (8, 1)}
    torch.testing.assert_close(means[8][0], means[8][1], atol=1e-4, rtol=0)  # the offsets are gone
    assert (means[1][0] - means[1][1]).abs().max() > 0.5

    net = VQGAN(**dict(TINY, norm_groups=8, norm_out_groups=1))
    groups = {name: m.num_groups for name, m in net.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups.pop('decoder.norm_out') == 1
    assert set(groups.values()) == {8} and 'encoder.norm_out' in groups
    same_groups = VQGAN(**dict(TINY, norm_groups=8))
    assert _layout(net) == _layout(same_groups)
    same_groups.load_state_dict(net.state_dict())
    for bad, message in ((0, 'positive integer'), (5, '32 channels cannot be split into 5 groups')):
        with pytest.raises(ValueError, match=message):
            VQGAN(**dict(TINY, norm_groups=8, norm_out_groups=bad))
    # one channel a group in that norm alone is reported, as it is for the other norms
    warned = _basicsr_warnings(lambda: VQGAN(**dict(TINY, norm_groups=8, norm_out_groups=32)))
    assert "decoder's last GroupNorm" in warned and 'norm_out_groups: 1' in warned
    assert 'GroupNorm' not in _basicsr_warnings(lambda: VQGAN(**dict(TINY, norm_groups=8, norm_out_groups=8)))


def test_colour_path_gives_the_codes_the_block_colours():
    """``colour_path``: the quantiser sees the encoder's output plus a projection of the 16x16 block
    means, and the image is the decoder's on top of the codes' colours upsampled bicubically. At
    initialisation the path alone passes colours through; off (taming's layout) by default."""
    assert not any(k.startswith('colour_path.') for k in VQGAN(**TINY).state_dict())
    torch.manual_seed(0)
    net = VQGAN(**dict(TINY, norm_groups=8, colour_path=True)).eval()
    assert [k for k in net.state_dict() if k.startswith('colour_path.')] == [
        'colour_path.to_latent.weight', 'colour_path.to_latent.bias', 'colour_path.from_latent.weight',
        'colour_path.from_latent.bias']
    path, f = net.colour_path, net.downsample_factor
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    block_means = F.avg_pool2d(x, f)
    upsampled = F.interpolate(block_means, scale_factor=f, mode='bicubic', align_corners=False)
    torch.testing.assert_close(path.decode(path.encode(x)), upsampled, atol=1e-5, rtol=0)
    assert path.decode(path.encode(x), size=(16, 24)).shape == (2, 3, 16, 24)  # a refinement level's size

    seen = []
    net.quantize.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        rec, _ = net(x)
        quant, _, _ = net.encode(x)
        torch.testing.assert_close(seen[0], net.quant_conv(net.encoder(x)) + path.encode(x))
        torch.testing.assert_close(rec, net.decoder(net.post_quant_conv(quant)) + path.decode(quant))
        image, feats = net.decode(quant, return_feat=True)
    torch.testing.assert_close(image, rec)
    assert set(feats) >= {'Level_1', 'Level_2'}
    with pytest.raises(ValueError, match='colour_path needs as many output channels as input channels'):
        VQGAN(**dict(TINY, norm_groups=8, colour_path=True, out_channels=1))
