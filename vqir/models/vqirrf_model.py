"""Stage 2 of VQIR: training the multi-scale refinement module (MSRM) behind a frozen stage 1.

    HR x (B, 3, H, W) -> frozen VQGAN encoder + IFRM -> LR (rounded to 8 bits)
      -> frozen IFRM reverse + VQGAN decoder -> decoder features at H/4, H/2, H
      -> MSRM -> Level_4 (H/4), Level_2 (H/2), Level_1 (H, the reconstruction)

    generator loss (MSRM only)
        = sum over k in {1, 2, 4}: L1(Level_k, HR↓k) (1) + LaplacianEdge(Level_k, HR↓k) (0.05)
        + LPIPS(Level_1, HR) (1) + hinge GAN of D(Level_1) (0.1)
    discriminator loss (basicsr's UNetDiscriminatorSN)
        = hinge(D(HR), real) + hinge(D(Level_1.detach()), fake)

HR↓2 and HR↓4 are the dataset's ``gt_level2``/``gt_level4`` (``MultiScaleHRDataset``).

Options: see :mod:`vqir.models.rescaling_base` for the network, weights and inference, plus
    network_d: the discriminator (``type: UNetDiscriminatorSN``); required when gan_opt is set.
    path.pretrain_network_d: discriminator weights (``strict_load_d``, ``param_key_d``).
    path.pretrain_network_g: usually the stage-1 ``net_g_*.pth``; its missing ``refine.*`` is logged.
    train.optim_g, train.optim_d: optimisers of the MSRM and the discriminator.
    train.pixel_opt (``L1Loss``), train.edge_opt (``LaplacianEdgeLoss``): applied at every level.
    train.perceptual_opt (``LPIPSLoss``, on Level_1): absent or ``loss_weight: 0`` -> not built.
        Its ImageNet backbone must be on disk (the run stops at start-up naming the file
        otherwise); ``pretrained_backbone: false`` runs the code path with a random backbone.
    train.gan_opt (basicsr ``GANLoss``, ``gan_type: hinge``, on Level_1): absent or
        ``loss_weight: 0`` -> no discriminator is built or trained.
    train.mixed_precision: ``bf16`` / ``fp16``: the frozen VQGAN, the MSRM, the LPIPS backbone and
        the discriminator run under autocast (the IFRM and the codebook search stay float32; the
        losses compare in float32); absent or ``fp32``: float32 throughout.
    train.lr_jpeg: {quality: [low, high], prob}: the LR goes through a real JPEG (quality drawn per
        sample) before the frozen IFRM's inverse, so the MSRM learns from what a shared LR decodes
        to (see :mod:`vqir.models.lr_jpeg`); val.lr_jpeg_quality: validation does the same at one quality.
    train.gan_start_iter (default 0): the GAN terms and the discriminator are on from the
        iteration after this one (as in the reference).
    train.net_d_iters (default 1), train.net_d_init_iters (default 0): basicsr's SRGAN schedule:
        the MSRM steps only on iterations that are multiples of net_d_iters and after
        net_d_init_iters; the discriminator steps on every iteration with the GAN on.

Logged: l_pix and l_edge (summed over the levels), l_percep, l_g_gan, l_g_total, l_d_real,
l_d_fake, l_d (GAN terms are 0 while the GAN is off, so every row has the same columns).
Validation outputs: ``LR``, ``Level_1``, ``Level_2``, ``Level_4`` (and ``SR``, the VQGAN decoder's
own image, with ``inference: decoder_image``); targets ``gt``, ``lq``, ``gt_level2``, ``gt_level4``.
"""
from collections import OrderedDict

import torch
from basicsr.archs import build_network
from basicsr.utils.registry import MODEL_REGISTRY

from vqir.models.rescaling_base import RescalingModel
from vqir.utils.options import OptionsError

__all__ = ['VQIRRFModel']

# Output level -> dataset key of its target.
LEVEL_TARGETS = OrderedDict(Level_1='gt', Level_2='gt_level2', Level_4='gt_level4')


@MODEL_REGISTRY.register()
class VQIRRFModel(RescalingModel):
    """Stage 2: the MSRM (``refine``) and a discriminator learn; VQGAN and IFRM are frozen."""

    stage = 2
    train_keys = RescalingModel.train_keys + ('gan_start_iter', 'net_d_iters', 'net_d_init_iters')
    trainable_parts = ('refine', )
    parts_a_checkpoint_may_lack = ('refine', )
    output_keys = tuple(LEVEL_TARGETS)
    default_saved_outputs = ('LR', ) + tuple(LEVEL_TARGETS)

    def init_training_settings(self):
        train_opt = self.opt['train']
        opt_path = self.opt.get('opt_path', 'options')
        self.cri_pix = self.build_loss_if_weighted('pixel_opt')
        self.cri_edge = self.build_loss_if_weighted('edge_opt')
        self.cri_perceptual = self.build_loss_if_weighted('perceptual_opt')
        self.cri_gan = self.build_loss_if_weighted('gan_opt')
        if not any((self.cri_pix, self.cri_edge, self.cri_perceptual, self.cri_gan)):
            raise OptionsError(f'{opt_path}: stage 2 needs at least one of train.pixel_opt, edge_opt, perceptual_opt, '
                               'gan_opt')
        self.gan_start_iter = train_opt.get('gan_start_iter', 0)
        self.net_d_iters = train_opt.get('net_d_iters', 1)
        self.net_d_init_iters = train_opt.get('net_d_init_iters', 0)

        for key in ('optim_g', ) + (('optim_d', ) if self.cri_gan else ()):
            if key not in train_opt:
                raise OptionsError(f'{opt_path}: option train:{key} is required')
        self.params_g = self.trainable_parameters()
        self.optimizer_g = self.build_optimizer('optim_g', self.params_g)
        self.net_d = None
        if self.cri_gan is not None:
            if 'network_d' not in self.opt:
                raise OptionsError(f'{opt_path}: train.gan_opt needs a discriminator in network_d '
                                   '(e.g. type: UNetDiscriminatorSN)')
            self.net_d = self.model_to_device(build_network(self.opt['network_d']))
            self.load_pretrained(self.net_d, 'd')
            self.net_d.train()
            self.saved_networks['net_d'] = self.net_d
            self.params_d = [p for p in self.get_bare_model(self.net_d).parameters() if p.requires_grad]
            self.optimizer_d = self.build_optimizer('optim_d', self.params_d)
        self.lr_channel = self.lr_jpeg_channel(differentiable=False)  # no gradient reaches the LR in stage 2
        self.setup_schedulers()

    def gan_is_on(self, current_iter):
        return self.cri_gan is not None and current_iter > self.gan_start_iter

    def _set_d_requires_grad(self, flag):
        for p in self.params_d:
            p.requires_grad_(flag)

    def _as_rgb(self, x):
        """Network-space image -> RGB channel order (LPIPS was calibrated on RGB)."""
        return x.flip(1) if self.network_color == 'bgr' else x

    def optimize_parameters(self, current_iter):
        targets = OrderedDict(
            (level, self.to_network(self.required_target(key, 'use MultiScaleHRDataset')))
            for level, key in LEVEL_TARGETS.items())
        gan_on = self.gan_is_on(current_iter)
        g_step = current_iter % self.net_d_iters == 0 and current_iter > self.net_d_init_iters
        zero = torch.zeros((), device=self.device)

        # MSRM step; the discriminator only judges, it gets no gradients here
        if self.net_d is not None:
            self._set_d_requires_grad(False)
        with torch.set_grad_enabled(g_step), self.autocast():
            out = self.net_g(targets['Level_1'], is_train=True, lr_channel=self.lr_channel)
        out = OrderedDict((key, value.float()) for key, value in out.items())  # losses compare in float32
        loss_dict = OrderedDict()
        if g_step:
            if self.cri_pix is not None:
                loss_dict['l_pix'] = sum(self.cri_pix(out[level], target) for level, target in targets.items())
            if self.cri_edge is not None:
                loss_dict['l_edge'] = sum(self.cri_edge(out[level], target) for level, target in targets.items())
            with self.autocast():  # the LPIPS backbone and the discriminator
                if self.cri_perceptual is not None:
                    loss_dict['l_percep'] = self.cri_perceptual(self._as_rgb(out['Level_1']),
                                                                self._as_rgb(targets['Level_1'])).float()
                if self.cri_gan is not None:
                    loss_dict['l_g_gan'] = (self.cri_gan(self.net_d(out['Level_1']).float(), True, is_disc=False)
                                            if gan_on else zero)
            l_g_total = sum(loss_dict.values())
            loss_dict['l_g_total'] = l_g_total
            if not self.losses_are_finite(loss_dict):
                return
            if not self.backward_and_step(l_g_total, self.optimizer_g, self.params_g, 'refine'):
                return

        # discriminator step, on the reconstruction of the same forward pass
        if self.cri_gan is not None:
            loss_dict.update(l_d_real=zero, l_d_fake=zero, l_d=zero)
        if gan_on:
            self._set_d_requires_grad(True)
            with self.autocast():
                logits_real, logits_fake = self.net_d(targets['Level_1']), self.net_d(out['Level_1'].detach())
            l_d_real = self.cri_gan(logits_real.float(), True, is_disc=True)
            l_d_fake = self.cri_gan(logits_fake.float(), False, is_disc=True)
            l_d = l_d_real + l_d_fake
            loss_dict.update(l_d_real=l_d_real, l_d_fake=l_d_fake, l_d=l_d)
            if not self.losses_are_finite({'l_d': l_d}):
                return
            if not self.backward_and_step(l_d, self.optimizer_d, self.params_d, 'net_d'):
                return
        self.step_succeeded()
        if loss_dict:
            self.log_dict = self.reduce_loss_dict(OrderedDict((k, v.detach()) for k, v in loss_dict.items()))
