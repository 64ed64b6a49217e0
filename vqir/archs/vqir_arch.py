"""VQIR: extreme image rescaling with a frozen VQGAN prior, an IFRM and (stage 2) an MSRM.

Downscaling (images in [-1, 1], NCHW)::

    HR (B, 3, H, W) -> encoder -> quant_conv -> codebook  -> z_q (B, embed_dim, H/16, W/16)
      -> IFRM forward -> 8-bit quantisation -> LR (B, 3, H/s, W/s)          s = ir_scale (16 or 32)

Upscaling::

    LR -> IFRM reverse -> re_quant_feat (B, embed_dim, H/16, W/16) -> codebook -> post_quant_conv
      -> decoder -> SR (B, 3, H, W) and decoder features Level_1/2/4/...
      -> (stage 2) MSRM -> Level_4 (H/4), Level_2 (H/2), Level_1 (H, the final image)

Under ``torch.autocast`` (mixed-precision training, half-precision inference) the codebook
search and the IFRM still run in float32. The VQGAN parts (encoder, quantize, quant_conv,
post_quant_conv, decoder) always run without gradients. In stage 1 gradients reach only the
IFRM; in stage 2 the IFRM also runs without gradients and only the refinement module
(``refine``) can learn.

Attribute names and state_dict order (encoder, decoder, quantize, quant_conv, post_quant_conv,
refine in stage 2, icrm) equal the official checkpoints, which therefore load strictly.
"""
import copy
from contextlib import contextmanager

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn
from torch.nn import functional as F

from .lr_quantizer import quantize_lr
from .vqgan_arch import NORM_GROUPS, BlockColourPath, Decoder, Encoder, VectorQuantizer, warn_if_single_channel_groups

VQGAN_DOWNSAMPLE_FACTOR = 16


def add_colour_base(images, quant_feat, colour_path):
    """Images ``{'name': (B, 3, h, w)}`` on the block colours of the codes ``quant_feat`` (upsampled
    to each size), when the prior has a ``colour_path`` (a :class:`BlockColourPath`); else as they are."""
    if colour_path is None:
        return images
    return {name: out + colour_path.decode(quant_feat, out.shape[-2:]) for name, out in images.items()}


def refined_images(refine, dec_feat, decoder_image=None):
    """The refinement module's images ``{'Level_4', 'Level_2', 'Level_1'}`` from the decoder features; with
    ``decoder_image`` ``(B, 3, H, W)`` (VQIR's ``refine_residual``) each is a correction added to that image,
    area-downscaled to its level's size."""
    images = refine(dec_feat)
    if decoder_image is None:
        return images
    return {name: out + F.adaptive_avg_pool2d(decoder_image, out.shape[-2:]) for name, out in images.items()}


def _build_registered(part_opt, defaults, where):
    """Build ``{'type': name, **kwargs}`` from ARCH_REGISTRY; ``defaults`` fill the keys it does not give."""
    if not isinstance(part_opt, dict) or 'type' not in part_opt:
        raise ValueError(f"VQIR: option '{where}' must be a dict with a 'type' key, got {part_opt!r}")
    kwargs = copy.deepcopy(part_opt)
    arch_type = kwargs.pop('type')
    for key, value in defaults.items():
        kwargs.setdefault(key, value)
    return ARCH_REGISTRY.get(arch_type)(**kwargs)


@ARCH_REGISTRY.register()
class VQIR(nn.Module):
    """The VQIR rescaling network (stage 1: VQGAN + IFRM; stage 2: + MSRM refinement).

    Args:
        stage: 1 (train the IFRM) or 2 (train the refinement module ``refine``).
        ir_scale: rescaling factor of the LR, 16 or 32.
        in_channels, out_channels: image channels (3).
        ch, ch_mult, double_z, num_res_blocks, z_channels: VQGAN encoder/decoder layout; the
            VQGAN must downsample by 16 (``len(ch_mult) == 5``).
        n_embed, embed_dim: codebook size and code dimension (the IFRM's input channels).
        attn_mult: stage 2 only: attention pairs per refinement branch, e.g. ``[3, 3]``.
        beta, remap, sane_index_shape: passed to the codebook quantiser.
        ifrm: optional ``{'type': ..., **kwargs}`` to swap the IFRM (default ``{'type': 'IFRM'}``).
            Missing ``in_channels`` / ``out_channels`` / ``ir_scale`` are filled with
            ``embed_dim`` / ``out_channels`` / ``ir_scale``. Must provide ``forward(x, rev=False)``.
        msrm: optional ``{'type': ..., **kwargs}`` to swap the refinement module (stage 2,
            default ``{'type': 'MSRM'}``). Missing ``ch`` / ``ch_mult`` / ``attn_mult`` are filled
            with this network's values (``norm_groups`` too). Must map the decoder features dict to
            ``{'Level_4', 'Level_2', 'Level_1'}`` images.
        norm_groups: groups of the VQGAN's (and the MSRM's) GroupNorms; 32, taming's, by default.
            The VQGAN part must match the prior it loads (see :class:`vqir.archs.vqgan_arch.VQGAN`).
        norm_out_groups: groups of the VQGAN decoder's last GroupNorm, as the prior was trained
            (None: ``norm_groups``; see :class:`vqir.archs.vqgan_arch.VQGAN`).
        colour_path: the prior has VQGAN's block-colour path (``colour_path.*``, frozen with the
            prior): the SR and every MSRM level are added to the codes' colours, upsampled.
        refine_residual: stage 2: the MSRM corrects the decoder's image instead of drawing each level
            anew: each level is the decoder's image, area-downscaled to it, plus the MSRM's image,
            whose output convolutions start at zero (an untrained MSRM gives stage 1's image).
    """

    def __init__(self,
                 stage,
                 ir_scale,
                 in_channels,
                 out_channels,
                 ch,
                 ch_mult,
                 double_z,
                 num_res_blocks,
                 z_channels,
                 n_embed,
                 embed_dim,
                 attn_mult=None,
                 beta=0.25,
                 remap=None,
                 sane_index_shape=False,
                 ifrm=None,
                 msrm=None,
                 norm_groups=NORM_GROUPS,
                 norm_out_groups=None,
                 colour_path=False,
                 refine_residual=False):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f'VQIR: stage must be 1 or 2, got {stage!r}')
        if ir_scale not in (16, 32):
            raise ValueError(f'VQIR: ir_scale must be 16 or 32, got {ir_scale!r}')
        ch_mult = list(ch_mult)
        if 2**(len(ch_mult) - 1) != VQGAN_DOWNSAMPLE_FACTOR:
            raise ValueError(f'VQIR: the VQGAN must downsample by {VQGAN_DOWNSAMPLE_FACTOR}, i.e. ch_mult needs '
                             f'5 entries, got ch_mult={ch_mult}')
        warn_if_single_channel_groups(ch, ch_mult, norm_groups, 'VQIR', norm_out_groups)
        self.stage = stage
        self.ir_scale = ir_scale
        self.in_channels = in_channels
        self.out_channels = out_channels

        # the frozen VQGAN prior, laid out as taming's VQModel
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, in_channels=in_channels,
                               z_channels=z_channels, double_z=double_z, norm_groups=norm_groups)
        self.decoder = Decoder(ch=ch, out_channels=out_channels, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               z_channels=z_channels, norm_groups=norm_groups, norm_out_groups=norm_out_groups)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, remap=remap,
                                        sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(2 * z_channels if double_z else z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        # the prior's block-colour path, when it was trained with one (VQGAN's colour_path)
        self.colour_path = BlockColourPath.build(colour_path, in_channels, out_channels, embed_dim,
                                                 VQGAN_DOWNSAMPLE_FACTOR, 'VQIR')

        if stage == 2:
            msrm_opt = {'type': 'MSRM'} if msrm is None else msrm
            if attn_mult is None and 'attn_mult' not in msrm_opt:
                raise ValueError('VQIR: stage 2 needs attn_mult (attention pairs per refinement branch, '
                                 'e.g. [3, 3] for the official models)')
            msrm_defaults = {'ch': ch, 'ch_mult': ch_mult, 'attn_mult': attn_mult}
            if norm_groups != NORM_GROUPS:  # a swapped-in module without the argument keeps working by default
                msrm_defaults['norm_groups'] = norm_groups
            self.refine = _build_registered(msrm_opt, msrm_defaults, 'msrm')
        elif msrm is not None:
            raise ValueError('VQIR: msrm is only used in stage 2, got stage 1')
        if refine_residual and stage != 2:
            raise ValueError('VQIR: refine_residual is only used in stage 2, got stage 1')
        self.refine_residual = bool(refine_residual)

        # As in the reference: every part built so far gets the transformer-style init; the
        # IFRM is built afterwards so that it keeps its own (identity-like couplings, orthogonal
        # 1x1 convs, fixed Haar filters).
        self.apply(self._init_weights)
        if self.colour_path is not None:
            self.colour_path.reset_from_latent()
        if self.refine_residual:
            self.refine.zero_image_outputs()

        ifrm_opt = {'type': 'IFRM'} if ifrm is None else ifrm
        self.icrm = _build_registered(
            ifrm_opt, {'in_channels': embed_dim, 'out_channels': out_channels, 'ir_scale': ir_scale}, 'ifrm')

    @staticmethod
    @torch.no_grad()
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def ifrm(self):
        """The invertible feature recovery module (stored as ``icrm``, the checkpoints' name)."""
        return self.icrm

    def get_last_layer(self):
        """Weight of the last layer producing the output image (for an adaptive GAN loss weight).

        Stage 1: the VQGAN decoder's ``conv_out``. Stage 2: ``refine.get_last_layer()`` when the
        refinement module provides it, else the decoder's ``conv_out`` (the reference's choice).
        """
        if self.stage == 2 and hasattr(self.refine, 'get_last_layer'):
            return self.refine.get_last_layer()
        return self.decoder.conv_out.weight

    def _check_hr(self, x_hr):
        if (x_hr.dim() != 4 or x_hr.shape[1] != self.in_channels or x_hr.shape[2] % self.ir_scale
                or x_hr.shape[3] % self.ir_scale):
            raise ValueError(f'VQIR: HR input must be (B, {self.in_channels}, H, W) with H and W multiples of '
                             f'ir_scale {self.ir_scale} (crop first), got {tuple(x_hr.shape)}')

    @torch.no_grad()
    def encode(self, x_hr):
        """HR ``(B, 3, H, W)`` -> codebook vectors ``(B, embed_dim, H/16, W/16)`` (no gradients)."""
        self._check_hr(x_hr)
        z = self.quant_conv(self.encoder(x_hr))
        if self.colour_path is not None:
            z = z + self.colour_path.encode(x_hr)
        quant_feat, _, _ = self.quantize(z)
        return quant_feat

    @contextmanager
    def _ifrm_context(self, x):
        """Gradients only in stage 1; float32 even under autocast: the reverse pass undoes the
        forward only to the precision it ran in, and the LR lies on a 1/255 grid."""
        grad = torch.is_grad_enabled() and self.stage == 1
        with torch.autocast(device_type=x.device.type, enabled=False), torch.set_grad_enabled(grad):
            yield

    def _features_to_lr(self, quant_feat, noise):
        """IFRM forward + 8-bit quantisation (float32); without gradients in stage 2."""
        with self._ifrm_context(quant_feat):
            return quantize_lr(self.icrm(quant_feat.float(), rev=False), noise=noise)

    def _lr_to_features(self, lr):
        """IFRM reverse (float32): LR -> ``re_quant_feat`` ``(B, embed_dim, H/16, W/16)``; without
        gradients in stage 2."""
        with self._ifrm_context(lr):
            return self.icrm(lr.float(), rev=True)

    @torch.no_grad()
    def _decode(self, re_quant_feat, image=True):
        """Re-quantise and decode: -> (the decoder's image ``(B, 3, H, W)``, before the colour path's
        colours, or None without ``image``; decoder features ``{'Level_1', 'Level_2', ...}``; the codebook
        vectors ``(B, embed_dim, H/16, W/16)``)."""
        quant_feat, _, _ = self.quantize(re_quant_feat)
        image, dec_feat = self.decoder(self.post_quant_conv(quant_feat), return_feat=True, image=image)
        return image, dec_feat, quant_feat

    def _images(self, image, dec_feat, quant_feat, with_sr=True):
        """The output images: ``SR`` (the decoder's, when ``image`` is given and ``with_sr``) and, in stage 2,
        the MSRM's ``{'Level_4', 'Level_2', 'Level_1'}``; with a colour path, each on the block colours of the
        codes upsampled to its size (as the prior's decoder adds its image to them)."""
        images = {'SR': image} if image is not None and with_sr else {}
        if self.stage == 2:
            images.update(refined_images(self.refine, dec_feat, image if self.refine_residual else None))
        return add_colour_base(images, quant_feat, self.colour_path)

    def downscale(self, x_hr, noise=False):
        """HR ``(B, 3, H, W)`` in [-1, 1] -> LR ``(B, 3, H/s, W/s)`` on the 8-bit grid of [-1, 1].

        ``noise=True`` replaces rounding by uniform noise of +-0.5/255 (in [0, 1] units), as in
        stage-1 training; see :func:`vqir.archs.lr_quantizer.quantize_lr`.
        """
        return self._features_to_lr(self.encode(x_hr), noise=noise)

    def upscale(self, lr, return_feat=False):
        """LR ``(B, 3, H/s, W/s)`` in [-1, 1] -> dict of reconstructions.

        Keys: ``re_quant_feat`` ``(B, embed_dim, H/16, W/16)`` (IFRM reverse output, before
        re-quantisation), ``SR`` ``(B, 3, H, W)`` (VQGAN decoder output) and, in stage 2,
        ``Level_4`` ``(B, 3, H/4, W/4)``, ``Level_2`` ``(B, 3, H/2, W/2)``, ``Level_1`` ``(B, 3, H, W)``
        (the final image). ``return_feat`` adds ``dec_feat``: the decoder's level features
        ``{'Level_1': (B, C1, H, W), 'Level_2': ..., ...}``.
        """
        if lr.dim() != 4 or lr.shape[1] != self.out_channels:
            raise ValueError(f'VQIR: LR input must be (B, {self.out_channels}, h, w), got {tuple(lr.shape)}')
        re_quant_feat = self._lr_to_features(lr)
        image, dec_feat, quant_feat = self._decode(re_quant_feat)
        res = {'re_quant_feat': re_quant_feat}
        res.update(self._images(image, dec_feat, quant_feat))
        if return_feat:
            res['dec_feat'] = dec_feat
        return res

    def forward(self, x_hr, is_train=True, lr_channel=None):
        """HR ``(B, 3, H, W)`` -> dict, with the reference's keys.

        Stage 1: ``quant_feat``, ``LR``, ``re_quant_feat`` and, when ``is_train`` is False,
        ``SR``. With ``is_train`` the LR uses noise instead of rounding.
        Stage 2: ``LR``, ``Level_4``, ``Level_2``, ``Level_1``; the LR is always rounded.
        ``lr_channel``: what happens to the LR between the two passes of the IFRM (e.g. a JPEG),
        a function of the network-space LR; ``LR`` is the LR before it.
        """
        quant_feat = self.encode(x_hr)
        if self.stage == 1:
            lr = self._features_to_lr(quant_feat, noise=is_train)
            re_quant_feat = self._lr_to_features(lr if lr_channel is None else lr_channel(lr))
            res = {'quant_feat': quant_feat, 'LR': lr, 're_quant_feat': re_quant_feat}
            if not is_train:
                res['SR'] = self._images(*self._decode(re_quant_feat))['SR']
            return res

        lr = self._features_to_lr(quant_feat, noise=False)
        received = lr if lr_channel is None else lr_channel(lr)
        # the MSRM makes the images (on the decoder's with refine_residual)
        image, dec_feat, quant_feat = self._decode(self._lr_to_features(received), image=self.refine_residual)
        res = {'LR': lr}
        res.update(self._images(image, dec_feat, quant_feat, with_sr=False))
        return res
