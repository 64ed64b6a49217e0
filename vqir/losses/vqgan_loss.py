"""Stage-0 objective: training the VQGAN itself (taming's ``VQLPIPSWithDiscriminator`` as a loss object).

Generator (encoder, codebook, decoder) step:

    nll   = mean(pixel_weight * |x - x̂| + l2_weight * (x - x̂)^2) + perceptual_weight * mean_b LPIPS(x, x̂)
            + lowpass_weight * mean |A_f(x) - A_f(x̂)|
            (with ``chroma_weight``, x - x̂ is taken in YCbCr, Cb and Cr weighted: see ``pixel_difference``;
            A_f averages f x f blocks, f = ``lowpass_factor``)
    g     = GAN generator term on D(x̂)                 (hinge: -mean D(x̂))
    λ     = clamp(||∇_last nll|| / (||∇_last g|| + 1e-4), 0, 1e4) * disc_weight   (adaptive weight)
    loss  = loss_weight * (nll + λ * disc_factor * g + codebook_weight * codebook_loss)

Discriminator step:

    loss  = disc_factor * 0.5 * (ℓ_real(D(x)) + ℓ_fake(D(x̂)))
            (hinge: ℓ_real = mean relu(1 - D(x)), ℓ_fake = mean relu(1 + D(x̂)))

``last`` is the decoder's last layer weight (``VQGAN.get_last_layer()``). Before iteration
``disc_start`` the GAN terms are switched off (disc_factor 0), as taming's ``adopt_weight``.
The discriminator network lives in the model, not here: this object only turns its logits into losses.
"""
import torch
import torch.nn.functional as F
from basicsr.losses.gan_loss import GANLoss
from basicsr.utils.color_util import rgb2ycbcr_pt
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from vqir.losses.lpips_loss import LPIPSLoss

__all__ = ['VQGANLoss', 'adaptive_gan_weight', 'pixel_difference']

_GAN_TYPES = ('hinge', 'vanilla')


def adaptive_gan_weight(nll_loss, g_loss, last_layer, max_weight=1e4, eps=1e-4):
    """Balance the GAN term against the reconstruction term at the decoder's last layer.

    Args:
        nll_loss (Tensor): scalar reconstruction (+ perceptual) loss.
        g_loss (Tensor): scalar generator GAN loss.
        last_layer (Tensor): the parameter both losses depend on, e.g. decoder.conv_out.weight.

    Returns:
        Tensor: detached scalar ||∇nll|| / (||∇g|| + eps), clamped to [0, max_weight].
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + eps)
    return torch.clamp(weight, 0.0, max_weight).detach()


def pixel_difference(inputs, reconstructions, chroma_weight=None):
    """x - x̂ of (B, 3, H, W) images in [-1, 1]: in RGB, or with ``chroma_weight`` in YCbCr (BT.601)
    as (ΔY, w ΔCb, w ΔCr), in the same [-1, 1] units.

    RGB channels are strongly correlated: an RGB loss is mostly a luma loss, and a small network
    fits brightness long before hue. Weighting the decorrelated chroma channels makes colour
    errors cost as much as the eye finds them.
    """
    diff = inputs - reconstructions
    if chroma_weight is None:
        return diff
    # YCbCr is affine in RGB: the difference of the conversions is the linear part applied to diff,
    # i.e. the conversion of diff less the conversion's offset (that of black, one pixel)
    ycbcr = rgb2ycbcr_pt(diff / 2) - rgb2ycbcr_pt(diff.new_zeros(1, 3, 1, 1))
    weights = diff.new_tensor([1.0, chroma_weight, chroma_weight]).view(1, 3, 1, 1)
    return 2 * ycbcr * weights


@LOSS_REGISTRY.register()
class VQGANLoss(nn.Module):
    """Reconstruction + perceptual + codebook + adaptively weighted GAN loss for VQGAN training.

    Args:
        disc_start (int): first iteration (``global_step >= disc_start``) at which the GAN terms count.
        loss_weight (float): overall scale of the generator objective (1.0 as in taming).
        pixel_weight (float): weight of the per-pixel L1 term.
        chroma_weight (float | None): None (taming): the pixel terms compare RGB. A number: they
            compare YCbCr, with Cb and Cr weighted by it (e.g. 4), see ``pixel_difference``.
        l2_weight (float): weight of an optional per-pixel squared-error term (0: taming).
        lowpass_weight (float): weight of an L1 term between the f x f block means of the input and
            the reconstruction (0: taming). It asks the codes to carry each block's mean colour, which
            is what a 16x downscaled image keeps of the photo and where a per-pixel loss, spread over
            the block's detail, pushes weakly.
        lowpass_factor (int): f, the block side of ``lowpass_weight`` (16: one block per code of an
            f16 VQGAN, one pixel of a 16x LR).
        perceptual_weight (float): weight of LPIPS; 0 builds no LPIPS network at all.
        perceptual_net (str): LPIPS backbone, 'vgg' (taming) or 'alex'.
        perceptual_pretrained_backbone (bool): False gives a randomly initialised LPIPS backbone (tests).
        codebook_weight (float): weight of the quantiser's codebook + commitment loss.
        disc_weight (float): multiplies the adaptive weight (taming's f16 ImageNet config: 0.8).
        disc_factor (float): GAN factor once ``disc_start`` is reached (taming: 1.0).
        gan_type (str): 'hinge' (taming default) or 'vanilla'. Both use basicsr's GANLoss; for
            'vanilla' the generator term is the non-saturating softplus(-D(x̂)), where taming
            keeps -mean D(x̂).
    """

    @staticmethod
    def required_weights(perceptual_weight=1.0, perceptual_net='vgg', perceptual_pretrained_backbone=True, **kwargs):
        """The weight files a loss with these options reads (checked before a run starts)."""
        return LPIPSLoss.required_weights(perceptual_weight, perceptual_net, perceptual_pretrained_backbone)

    def __init__(self,
                 disc_start,
                 loss_weight=1.0,
                 pixel_weight=1.0,
                 chroma_weight=None,
                 l2_weight=0.0,
                 lowpass_weight=0.0,
                 lowpass_factor=16,
                 perceptual_weight=1.0,
                 perceptual_net='vgg',
                 perceptual_pretrained_backbone=True,
                 codebook_weight=1.0,
                 disc_weight=1.0,
                 disc_factor=1.0,
                 gan_type='hinge'):
        super().__init__()
        if gan_type not in _GAN_TYPES:
            raise ValueError(f'VQGANLoss: gan_type must be one of {_GAN_TYPES}, got {gan_type!r}.')
        self.disc_start = disc_start
        self.loss_weight = loss_weight
        self.pixel_weight = pixel_weight
        if chroma_weight is not None and not chroma_weight > 0:
            raise ValueError(f'VQGANLoss: chroma_weight must be a positive number or None, got {chroma_weight!r}.')
        self.chroma_weight = chroma_weight
        self.l2_weight = l2_weight
        if not lowpass_weight >= 0:
            raise ValueError(f'VQGANLoss: lowpass_weight must be >= 0, got {lowpass_weight!r}.')
        if not (isinstance(lowpass_factor, int) and lowpass_factor >= 1):
            raise ValueError(f'VQGANLoss: lowpass_factor must be a positive integer, got {lowpass_factor!r}.')
        self.lowpass_weight = lowpass_weight
        self.lowpass_factor = lowpass_factor
        self.perceptual_weight = perceptual_weight
        self.codebook_weight = codebook_weight
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.gan_type = gan_type
        self.perceptual = None
        if perceptual_weight > 0:
            self.perceptual = LPIPSLoss(
                loss_weight=1.0,
                net=perceptual_net,
                input_range=(-1, 1),
                pretrained_backbone=perceptual_pretrained_backbone)
        self.gan_loss = GANLoss(gan_type, real_label_val=1.0, fake_label_val=0.0, loss_weight=1.0)

    def gan_factor(self, global_step):
        """disc_factor once ``global_step >= disc_start``, else 0 (taming's adopt_weight)."""
        return self.disc_factor if global_step >= self.disc_start else 0.0

    def generator_loss(self, inputs, reconstructions, codebook_loss, logits_fake, global_step, last_layer):
        """Objective of the autoencoder step.

        Args:
            inputs (Tensor): (B, 3, H, W), the HR images in [-1, 1].
            reconstructions (Tensor): (B, 3, H, W), the VQGAN output.
            codebook_loss (Tensor): scalar (or per-sample) quantiser loss; its mean is used.
            logits_fake (Tensor | None): D(reconstructions), any shape. May be None while the GAN
                term is off (``global_step < disc_start`` or ``disc_factor == 0``).
            global_step (int): current iteration.
            last_layer (Tensor | None): the decoder's last layer weight. Needed for the adaptive
                weight whenever the GAN term is on and gradients are enabled; under ``torch.no_grad``
                (validation) the adaptive weight is 0, as in taming.

        Returns:
            tuple[Tensor, dict[str, Tensor]]: scalar loss and detached scalars 'l_total', 'l_pix' (every
            pixel term, weighted), 'l_lowpass' (the unweighted block-mean L1),
            'l_percep', 'l_nll', 'l_codebook', 'l_g_gan', 'd_weight', 'disc_factor'.
        """
        if inputs.shape != reconstructions.shape:
            raise ValueError(f'VQGANLoss: inputs have shape {tuple(inputs.shape)} but reconstructions '
                             f'{tuple(reconstructions.shape)}.')
        diff = pixel_difference(inputs, reconstructions, self.chroma_weight)
        pixel_loss = self.pixel_weight * diff.abs().mean()
        if self.l2_weight > 0:
            pixel_loss = pixel_loss + self.l2_weight * diff.square().mean()
        lowpass_loss = inputs.new_zeros(())
        if self.lowpass_weight > 0:
            # the colour conversion is linear in the difference, so block means of diff are the
            # difference of the block means (a partial block at the border is averaged as it is)
            lowpass_loss = F.avg_pool2d(diff, self.lowpass_factor, ceil_mode=True).abs().mean()
            pixel_loss = pixel_loss + self.lowpass_weight * lowpass_loss
        if self.perceptual is not None:
            percep_loss = self.perceptual(reconstructions, inputs)
        else:
            percep_loss = inputs.new_zeros(())
        nll_loss = pixel_loss + self.perceptual_weight * percep_loss

        factor = self.gan_factor(global_step)
        zero = inputs.new_zeros(())
        if factor > 0:
            if logits_fake is None:
                raise ValueError(f'VQGANLoss: logits_fake is None at step {global_step}, but the GAN term is on '
                                 f'from disc_start={self.disc_start}.')
            g_loss = self.gan_loss(logits_fake, True, is_disc=False)
            if torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError('VQGANLoss: last_layer (the decoder\'s last weight) is needed for the '
                                     'adaptive GAN weight.')
                d_weight = adaptive_gan_weight(nll_loss, g_loss, last_layer) * self.disc_weight
            else:
                d_weight = zero
        else:
            g_loss, d_weight = zero, zero

        codebook_loss = codebook_loss.mean()
        loss = self.loss_weight * (nll_loss + d_weight * factor * g_loss + self.codebook_weight * codebook_loss)

        log = {
            'l_total': loss,
            'l_pix': pixel_loss,
            'l_lowpass': lowpass_loss,
            'l_percep': percep_loss,
            'l_nll': nll_loss,
            'l_codebook': codebook_loss,
            'l_g_gan': g_loss,
            'd_weight': d_weight,
            'disc_factor': inputs.new_tensor(float(factor)),
        }
        return loss, {key: value.detach().clone() for key, value in log.items()}

    def discriminator_loss(self, logits_real, logits_fake, global_step):
        """Objective of the discriminator step.

        Args:
            logits_real (Tensor): D(inputs), any shape (e.g. (B, 1, h, w) for a patch discriminator).
            logits_fake (Tensor): D(reconstructions.detach()), same kind of shape.
            global_step (int): current iteration.

        Returns:
            tuple[Tensor, dict[str, Tensor]]: scalar loss (0 before ``disc_start``) and detached
            scalars 'l_d', 'l_d_real', 'l_d_fake', 'out_d_real', 'out_d_fake' (mean logits).
        """
        factor = self.gan_factor(global_step)
        loss_real = self.gan_loss(logits_real, True, is_disc=True)
        loss_fake = self.gan_loss(logits_fake, False, is_disc=True)
        loss = factor * 0.5 * (loss_real + loss_fake)
        log = {
            'l_d': loss,
            'l_d_real': loss_real,
            'l_d_fake': loss_fake,
            'out_d_real': logits_real.mean(),
            'out_d_fake': logits_fake.mean(),
        }
        return loss, {key: value.detach().clone() for key, value in log.items()}
