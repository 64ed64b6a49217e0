"""Losses of the three training stages: values against hand computations, weights, registry, LPIPS wiring."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.losses import build_loss
from basicsr.utils.registry import LOSS_REGISTRY

from vqir.losses.edge_loss import LaplacianEdgeLoss
from vqir.losses.ifrm_loss import FeatureRecoveryLoss, GramLoss, LRGuidanceLoss, position_gram_matrix
from vqir.losses.lpips_loss import LPIPSLoss
from vqir.losses.vqgan_loss import VQGANLoss
from vqir.utils.lpips_weights import LPIPSWeightsNotFoundError

SQUARES = torch.tensor([[[[1., 2.], [3., 4.]]]])  # (1, 1, 2, 2): squared values 1, 4, 9, 16


# ----------------------------------------------------------------------------- registry

@pytest.mark.parametrize('opt, cls', [
    ({'type': 'LRGuidanceLoss', 'loss_weight': 0.5}, LRGuidanceLoss),
    ({'type': 'FeatureRecoveryLoss', 'loss_weight': 1.0}, FeatureRecoveryLoss),
    ({'type': 'GramLoss', 'loss_weight': 1.0}, GramLoss),
    ({'type': 'LaplacianEdgeLoss', 'loss_weight': 0.05}, LaplacianEdgeLoss),
    ({'type': 'VQGANLoss', 'disc_start': 10, 'perceptual_weight': 0.0, 'loss_weight': 1.0}, VQGANLoss),
])
def test_losses_build_from_basicsr_options(opt, cls):
    loss = build_loss(dict(opt))
    assert type(loss) is cls
    assert loss.loss_weight == opt['loss_weight']


def test_basicsr_losses_keep_their_names():
    import basicsr.losses.basic_loss as basic
    import basicsr.losses.gan_loss as gan
    assert LOSS_REGISTRY.get('L1Loss') is basic.L1Loss
    assert LOSS_REGISTRY.get('MSELoss') is basic.MSELoss
    assert LOSS_REGISTRY.get('GANLoss') is gan.GANLoss


# ----------------------------------------------------------------------------- stage 1 (IFRM)

def test_lr_guidance_loss_is_weighted_mse():
    zero = torch.zeros_like(SQUARES)
    assert LRGuidanceLoss()(SQUARES, zero).item() == pytest.approx(0.5 * 30 / 4)  # default weight 0.5
    assert LRGuidanceLoss(loss_weight=1.0, reduction='sum')(SQUARES, zero).item() == pytest.approx(30.0)
    none = LRGuidanceLoss(loss_weight=2.0, reduction='none')(SQUARES, zero)
    assert torch.equal(none, 2.0 * SQUARES**2)


def test_feature_recovery_loss_is_weighted_mse():
    target = torch.ones_like(SQUARES)  # differences 0, 1, 2, 3 -> squares 0, 1, 4, 9
    assert FeatureRecoveryLoss()(SQUARES, target).item() == pytest.approx(14 / 4)
    assert FeatureRecoveryLoss(loss_weight=3.0)(SQUARES, target).item() == pytest.approx(3 * 14 / 4)
    with pytest.raises(ValueError, match='shape'):
        FeatureRecoveryLoss()(SQUARES, torch.ones(1, 1, 2, 3))


def test_gram_loss_hand_computed():
    # (B=1, C=2, h=1, w=2): positions p0 = (1, 3), p1 = (2, 4).
    feat = torch.tensor([[[[1., 2.]], [[3., 4.]]]])
    # G = [[1+9, 2+12], [2+12, 4+16]] / (h*w = 2) = [[5, 7], [7, 10]]
    assert torch.equal(position_gram_matrix(feat), torch.tensor([[[5., 7.], [7., 10.]]]))
    # against zero features: mean(25, 49, 49, 100) = 55.75
    assert GramLoss()(feat, torch.zeros_like(feat)).item() == pytest.approx(55.75)
    assert GramLoss(loss_weight=2.0)(feat, torch.zeros_like(feat)).item() == pytest.approx(111.5)


def test_gram_loss_matches_loop_definition():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 5, 3, 4))
    b = rng.standard_normal((2, 5, 3, 4))
    n = 3 * 4
    fa, fb = a.reshape(2, 5, n), b.reshape(2, 5, n)
    expected = 0.0
    for k in range(2):
        for p in range(n):
            for q in range(n):
                ga = sum(fa[k, c, p] * fa[k, c, q] for c in range(5)) / n
                gb = sum(fb[k, c, p] * fb[k, c, q] for c in range(5)) / n
                expected += (ga - gb)**2
    expected /= 2 * n * n
    got = GramLoss()(torch.from_numpy(a), torch.from_numpy(b)).item()
    assert got == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- stage 2: edge loss

def test_laplacian_kernel_values():
    kernel = LaplacianEdgeLoss().kernel[0, 0]
    taps = torch.tensor([.05, .25, .4, .25, .05])
    assert kernel.shape == (5, 5)
    assert torch.allclose(kernel, taps[:, None] * taps[None, :])
    assert kernel[2, 2].item() == pytest.approx(0.16) and kernel[0, 0].item() == pytest.approx(0.0025)
    assert kernel.sum().item() == pytest.approx(1.0)


def test_laplacian_of_constant_image_hand_computed():
    # For a constant 1, L = 1 - 4 * a[i] * a[j], where a[i] is the sum of the 1-D taps that land on
    # even (non-zero) rows of the zero-stuffed image, replicate padding included. Interior: .05+.4+.05
    # = .25+.25 = .5 -> L = 0. Row 0: offsets -2,-1,0 all read row 0, +2 reads row 2 -> .05+.25+.4+.05 = .75.
    # Row 1: -2,-1 read row 0, +1 row 2 -> .05+.25+.25 = .55. Row 6: row 4 (.05), row 6 (.4) -> .45.
    # Row 7: only row 6 at offset -1 -> .25.
    a = torch.tensor([.75, .55, .5, .5, .5, .5, .45, .25])
    expected = 1 - 4 * a[:, None] * a[None, :]
    got = LaplacianEdgeLoss().laplacian(torch.ones(1, 1, 8, 8))[0, 0]
    assert torch.allclose(got, expected, atol=1e-6)


def _numpy_laplacian(img):
    """Straightforward loop version of the pyramid band-pass, (C, H, W) float64."""
    taps = np.array([.05, .25, .4, .25, .05])
    kernel = np.outer(taps, taps)

    def blur(x):
        padded = np.pad(x, ((0, 0), (2, 2), (2, 2)), mode='edge')
        out = np.zeros_like(x)
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                out[:, i, j] = (padded[:, i:i + 5, j:j + 5] * kernel).sum(axis=(1, 2))
        return out

    g = blur(img)
    stuffed = np.zeros_like(g)
    stuffed[:, ::2, ::2] = 4 * g[:, ::2, ::2]
    return img - blur(stuffed)


def test_laplacian_edge_loss_matches_numpy_definition():
    rng = np.random.default_rng(1)
    pred = rng.uniform(-1, 1, (2, 3, 7, 9))
    target = rng.uniform(-1, 1, (2, 3, 7, 9))
    expected = np.mean([np.abs(_numpy_laplacian(p) - _numpy_laplacian(t)) for p, t in zip(pred, target)])
    loss = LaplacianEdgeLoss()  # reference weight 0.05
    got = loss(torch.from_numpy(pred).float(), torch.from_numpy(target).float()).item()
    assert got == pytest.approx(0.05 * expected, rel=1e-5)
    got_sum = LaplacianEdgeLoss(loss_weight=1.0, reduction='sum')(torch.from_numpy(pred), torch.from_numpy(target))
    assert got_sum.item() == pytest.approx(expected * pred.size, rel=1e-9)


def test_laplacian_edge_loss_ignores_flat_offsets_and_passes_gradients():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    loss = LaplacianEdgeLoss()
    # A constant shift changes no band-pass value away from the border: only edges matter.
    lap = loss.laplacian(x + 0.7) - loss.laplacian(x)
    assert lap[..., 2:-2, 2:-2].abs().max().item() < 1e-5
    loss(x, torch.zeros_like(x)).backward()
    assert x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- stage 2: LPIPS

@pytest.fixture(scope='module')
def images():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 64, 64) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    return a, b


def _lpips_loss(**kwargs):
    torch.manual_seed(123)  # same random backbone for every instance
    return LPIPSLoss(net='alex', pretrained_backbone=False, **kwargs)


@pytest.fixture(scope='module')
def alex_loss():
    return _lpips_loss()


def test_lpips_loss_zero_for_identical_positive_otherwise(alex_loss, images):
    a, b = images
    assert alex_loss(a, a.clone()).item() == 0.0
    assert alex_loss(a, b).item() > 0


def test_lpips_loss_gradients_reach_input_not_lpips(alex_loss, images):
    a, b = images
    pred = b.clone().requires_grad_(True)
    alex_loss(pred, a).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    params = list(alex_loss.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)


def test_lpips_loss_stays_in_eval_mode(alex_loss):
    alex_loss.train()
    assert alex_loss.training and not alex_loss.lpips.training
    assert not any(m.training for m in alex_loss.lpips.modules())


def test_lpips_loss_weight_and_unit_input_range(alex_loss, images):
    a, b = images
    base = alex_loss(a, b)
    assert _lpips_loss(loss_weight=2.5)(a, b).item() == pytest.approx(2.5 * base.item(), rel=1e-6)
    unit = _lpips_loss(input_range=[0, 1])
    assert unit((a + 1) / 2, (b + 1) / 2).item() == pytest.approx(base.item(), rel=1e-5)
    with pytest.raises(ValueError, match='input_range'):
        LPIPSLoss(input_range=[0, 255], pretrained_backbone=False)


def test_lpips_loss_default_vgg_runs():
    torch.manual_seed(0)
    loss = LPIPSLoss(pretrained_backbone=False)  # net 'vgg'
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss.net_type == 'vgg'
    assert loss(x, x).item() == 0.0
    assert loss(x, -x).item() > 0


def test_lpips_loss_missing_weights_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    with pytest.raises(LPIPSWeightsNotFoundError) as err:
        LPIPSLoss(net='vgg')
    message = str(err.value)
    assert 'vgg16-397923af.pth' in message and str(tmp_path / 'hub' / 'checkpoints') in message


# ----------------------------------------------------------------------------- stage 0: VQGAN loss

def _tiny_vqgan_step(seed=0, feature_scale=1.0, disc_gain=1.0):
    """A 1x1-conv decoder last layer and a 1x1-conv patch discriminator, in float64."""
    gen = torch.Generator().manual_seed(seed)
    h = feature_scale * torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)  # features before last layer
    x = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64)  # target images
    weight = torch.randn(3, 4, 1, 1, generator=gen, dtype=torch.float64).requires_grad_(True)  # last layer
    v = disc_gain * torch.randn(1, 3, 1, 1, generator=gen, dtype=torch.float64)  # discriminator
    recon = F.conv2d(h, weight)
    logits_fake = F.conv2d(recon, v)
    return h, x, weight, v, recon, logits_fake


def _hand_adaptive_weight(h, x, weight, v):
    """Gradient norms of nll = mean|x - W h| and g = -mean(v . W h) w.r.t. W, written out."""
    h, x, w, v = (t.detach().numpy() for t in (h, x, weight, v))
    w, v = w[:, :, 0, 0], v[0, :, 0, 0]
    recon = np.einsum('oi,bihw->bohw', w, h)
    n_pix = x.size  # B * C_out * H * W
    n_logits = h.shape[0] * h.shape[2] * h.shape[3]  # B * H * W
    grad_nll = -np.einsum('bohw,bihw->oi', np.sign(x - recon), h) / n_pix
    grad_g = -np.outer(v, h.sum(axis=(0, 2, 3))) / n_logits
    g_loss = -np.einsum('o,bohw->', v, recon) / n_logits
    return np.linalg.norm(grad_nll) / (np.linalg.norm(grad_g) + 1e-4), g_loss, np.abs(x - recon).mean()


def test_vqgan_loss_without_perceptual_builds_no_lpips():
    loss = VQGANLoss(disc_start=0, perceptual_weight=0.0)
    assert loss.perceptual is None and list(loss.parameters()) == []


def test_vqgan_loss_adaptive_weight_equals_hand_ratio():
    h, x, weight, v, recon, logits_fake = _tiny_vqgan_step()
    loss = VQGANLoss(disc_start=5, perceptual_weight=0.0, codebook_weight=2.0, disc_weight=0.8)
    codebook = torch.tensor(0.3, dtype=torch.float64)
    total, log = loss.generator_loss(x, recon, codebook, logits_fake, global_step=5, last_layer=weight)
    ratio, g_loss, l1 = _hand_adaptive_weight(h, x, weight, v)
    assert log['d_weight'].item() == pytest.approx(0.8 * ratio, rel=1e-9)
    assert log['l_g_gan'].item() == pytest.approx(g_loss, rel=1e-9)
    assert log['disc_factor'].item() == 1.0
    assert total.item() == pytest.approx(l1 + 0.8 * ratio * g_loss + 2.0 * 0.3, rel=1e-9)
    total.backward()  # the graph survives the two autograd.grad calls
    assert weight.grad is not None


def test_vqgan_loss_adaptive_weight_is_clamped():
    # No gradient from the discriminator (v = 0) and large features: the ratio exceeds 1e4.
    h, x, weight, v, recon, logits_fake = _tiny_vqgan_step(feature_scale=100.0, disc_gain=0.0)
    ratio, _, _ = _hand_adaptive_weight(h, x, weight, v)
    assert ratio > 1e4
    loss = VQGANLoss(disc_start=0, perceptual_weight=0.0, disc_weight=0.5)
    _, log = loss.generator_loss(x, recon, torch.tensor(0.0), logits_fake, global_step=0, last_layer=weight)
    assert log['d_weight'].item() == pytest.approx(0.5 * 1e4)


def test_vqgan_loss_gan_off_before_disc_start():
    h, x, weight, v, recon, logits_fake = _tiny_vqgan_step()
    loss = VQGANLoss(disc_start=100, perceptual_weight=0.0, l2_weight=0.5, loss_weight=2.0)
    codebook = torch.tensor(0.25, dtype=torch.float64)
    for logits in (logits_fake, None):  # the model may skip the discriminator before disc_start
        total, log = loss.generator_loss(x, recon, codebook, logits, global_step=99, last_layer=weight)
        assert log['l_g_gan'].item() == 0.0 and log['d_weight'].item() == 0.0 and log['disc_factor'].item() == 0.0
        diff = (x - recon).detach()
        expected = 2.0 * (diff.abs().mean() + 0.5 * diff.square().mean() + 0.25)
        assert total.item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match='logits_fake'):
        loss.generator_loss(x, recon, codebook, None, global_step=100, last_layer=weight)


def test_vqgan_loss_lowpass_term_compares_block_means():
    """lowpass_weight adds the L1 of the f x f block means (partial blocks at the border averaged as
    they are): blind to detail that averages out within a block, it sees a colour shift of a block."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 20, 24, dtype=torch.float64) * 2 - 1
    loss = VQGANLoss(disc_start=100, perceptual_weight=0.0, lowpass_weight=3.0, lowpass_factor=8)
    plain = VQGANLoss(disc_start=100, perceptual_weight=0.0)
    zero = torch.tensor(0.0, dtype=torch.float64)
    shifted = x.clone()
    shifted[:, 0, 8:16, 8:16] += 0.4  # one whole block of the red channel
    total, log = loss.generator_loss(x, shifted, zero, None, global_step=0, last_layer=None)
    expected = 0.4 / (3 * 3 * 3)  # one of 3 x 3 blocks (rows 0-7, 8-15, 16-19) x 3 channels, per image
    assert log['l_lowpass'].item() == pytest.approx(expected, rel=1e-9)
    base, _ = plain.generator_loss(x, shifted, zero, None, global_step=0, last_layer=None)
    assert total.item() == pytest.approx(base.item() + 3.0 * expected, rel=1e-9)
    # +-0.4 in a checkerboard inside every block: the pixel term sees it, the block means do not
    checker = x + 0.4 * (torch.arange(20)[:, None] + torch.arange(24)[None, :]).remainder(2).mul(2).sub(1)
    _, log = loss.generator_loss(x, checker, zero, None, global_step=0, last_layer=None)
    assert log['l_lowpass'].item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match='lowpass_factor'):
        VQGANLoss(disc_start=0, lowpass_factor=0)


def test_vqgan_loss_no_grad_validation_gives_zero_adaptive_weight():
    _, x, weight, _, recon, logits_fake = _tiny_vqgan_step()
    loss = VQGANLoss(disc_start=0, perceptual_weight=0.0)
    with torch.no_grad():
        _, log = loss.generator_loss(x, recon.detach(), torch.tensor(0.0), logits_fake.detach(), 10, weight)
    assert log['d_weight'].item() == 0.0


def test_vqgan_discriminator_hinge_loss_formula():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 0.5])  # relu(1 + fake) = 0, 1, 1.5   -> mean 5/6
    loss = VQGANLoss(disc_start=10, perceptual_weight=0.0, disc_factor=1.0)
    d_loss, log = loss.discriminator_loss(real, fake, global_step=10)
    assert d_loss.item() == pytest.approx(0.5 * (5 / 6 + 5 / 6))
    assert log['l_d_real'].item() == pytest.approx(5 / 6) and log['l_d_fake'].item() == pytest.approx(5 / 6)
    assert log['out_d_real'].item() == pytest.approx(0.5) and log['out_d_fake'].item() == pytest.approx(-0.5)
    before, _ = loss.discriminator_loss(real, fake, global_step=9)
    assert before.item() == 0.0


def test_vqgan_discriminator_vanilla_loss_formula():
    real = torch.tensor([1.0, -0.5])
    fake = torch.tensor([0.2, -3.0])
    loss = VQGANLoss(disc_start=0, perceptual_weight=0.0, gan_type='vanilla', disc_factor=0.5)
    d_loss, _ = loss.discriminator_loss(real, fake, global_step=0)
    expected = 0.5 * 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match='gan_type'):
        VQGANLoss(disc_start=0, perceptual_weight=0.0, gan_type='wgan')


def test_vqgan_loss_perceptual_term_uses_lpips(images):
    a, b = images
    torch.manual_seed(7)
    loss = VQGANLoss(
        disc_start=10, perceptual_weight=0.7, perceptual_net='alex', perceptual_pretrained_backbone=False)
    assert all(not p.requires_grad for p in loss.parameters())
    recon = b.clone().requires_grad_(True)
    total, log = loss.generator_loss(a, recon, torch.tensor(0.0), None, global_step=0, last_layer=None)
    percep = loss.perceptual(b, a).item()
    assert percep > 0 and log['l_percep'].item() == pytest.approx(percep, rel=1e-6)
    assert total.item() == pytest.approx((a - b).abs().mean().item() + 0.7 * percep, rel=1e-5)
    total.backward()
    assert recon.grad.abs().sum() > 0


def test_vqgan_loss_chroma_weight_compares_ycbcr():
    from basicsr.utils.color_util import rgb2ycbcr_pt
    torch.manual_seed(0)
    x, rec = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    plain = VQGANLoss(disc_start=0, perceptual_weight=0, codebook_weight=0, disc_factor=0)
    chroma = VQGANLoss(disc_start=0, perceptual_weight=0, codebook_weight=0, disc_factor=0, chroma_weight=4.0)
    zero = torch.zeros(())
    l_plain, _ = plain.generator_loss(x, rec, zero, None, 0, None)
    l_chroma, log = chroma.generator_loss(x, rec, zero, None, 0, None)
    torch.testing.assert_close(l_plain, (x - rec).abs().mean())
    # by hand: the difference of the YCbCr images (in [-1, 1] units), chroma channels x4
    diff = 2 * (rgb2ycbcr_pt((x + 1) / 2) - rgb2ycbcr_pt((rec + 1) / 2))
    expected = (diff.abs() * torch.tensor([1.0, 4.0, 4.0]).view(1, 3, 1, 1)).mean()
    torch.testing.assert_close(l_chroma, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log['l_pix'], expected, rtol=1e-5, atol=1e-6)
    # a grey reconstruction of a coloured image costs more with chroma weighted; luma errors do not
    colour = torch.tensor([0.6, -0.2, -0.6]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    grey = colour.mean(1, keepdim=True).expand_as(colour)
    ratio = chroma.generator_loss(colour, grey, zero, None, 0, None)[0] / \
        VQGANLoss(disc_start=0, perceptual_weight=0, codebook_weight=0, disc_factor=0, chroma_weight=1.0) \
        .generator_loss(colour, grey, zero, None, 0, None)[0]
    assert 3.5 < ratio.item() <= 4.0
    with pytest.raises(ValueError, match='chroma_weight'):
        VQGANLoss(disc_start=0, perceptual_weight=0, chroma_weight=0)
