"""Stage 1 of VQIR: training the invertible feature recovery module (IFRM) on a frozen VQGAN.

    HR x (B, 3, H, W) -> frozen VQGAN encoder + codebook -> z_q (B, C, H/16, W/16)
      -> IFRM forward -> LR (B, 3, H/s, W/s), 8-bit quantisation simulated with uniform noise
      -> IFRM reverse -> ẑ (B, C, H/16, W/16)

    loss = guide: MSE(LR, bicubic HR↓s)  (0.5)
         + feature: MSE(ẑ, z_q)          (1)
         + Gram: MSE(Gram(ẑ), Gram(z_q))  (1)

Only the IFRM (``icrm``) learns; the VQGAN never changes and stays in eval mode. The bicubic
LR target is the dataset's ``lq`` (``HRImageDataset`` with ``ir_scale``).

Options: see :mod:`vqir.models.rescaling_base` for the network, weights and inference, plus
    train.optim_g: optimiser of the IFRM (paper: Adam, lr 1e-4, betas [0.9, 0.96]).
    train.mixed_precision: ``bf16`` / ``fp16`` run the frozen VQGAN encoder under autocast (the
        IFRM and the codebook search stay float32); absent or ``fp32``: float32 throughout.
    train.lr_jpeg: {quality: [low, high], prob}: a differentiable JPEG (kornia) between the IFRM's
        forward and inverse passes, each sample's quality drawn from the range (see
        :mod:`vqir.models.lr_jpeg`); the guide loss still compares the LR before it.
    val.lr_jpeg_quality: validation passes the LR through a real JPEG of this quality.
    train.guide_opt, train.feature_opt, train.gram_opt: the three losses
        (``LRGuidanceLoss``, ``FeatureRecoveryLoss``, ``GramLoss``); a missing one or one with
        ``loss_weight: 0`` is left out.

Logged: l_guide, l_feature, l_gram, l_total. Validation outputs: ``LR`` and ``SR`` (the
VQGAN decoder's reconstruction from the LR alone); targets ``gt`` and ``lq``.
"""
from collections import OrderedDict

from basicsr.utils.registry import MODEL_REGISTRY

from vqir.models.rescaling_base import RescalingModel
from vqir.utils.options import OptionsError

__all__ = ['VQIRModel']


@MODEL_REGISTRY.register()
class VQIRModel(RescalingModel):
    """Stage 1: the IFRM learns to carry the VQGAN's quantised features through an 8-bit LR."""

    stage = 1
    trainable_parts = ('icrm', )
    output_keys = ('SR', )
    default_saved_outputs = ('LR', 'SR')
    LOSSES = OrderedDict(l_guide='guide_opt', l_feature='feature_opt', l_gram='gram_opt')

    def init_training_settings(self):
        self.losses = OrderedDict()
        for name, key in self.LOSSES.items():
            loss = self.build_loss_if_weighted(key)
            if loss is not None:
                self.losses[name] = loss
        if not self.losses:
            raise OptionsError(f'{self.opt.get("opt_path", "options")}: stage 1 needs at least one of train.guide_opt, '
                               'train.feature_opt, train.gram_opt')
        self.params_g = self.trainable_parameters()
        if 'optim_g' not in self.opt['train']:
            raise OptionsError(f'{self.opt.get("opt_path", "options")}: option train:optim_g (the IFRM optimiser) is '
                               'required')
        self.optimizer_g = self.build_optimizer('optim_g', self.params_g)
        self.lr_channel = self.lr_jpeg_channel(differentiable=True)  # gradients reach the IFRM through it
        self.setup_schedulers()

    def optimize_parameters(self, current_iter):
        x = self.to_network(self.gt)
        with self.autocast():  # only the frozen encoder runs in low precision; the IFRM stays float32
            out = self.net_g(x, is_train=True, lr_channel=self.lr_channel)  # LR with noise instead of rounding
        loss_dict = OrderedDict()
        for name, loss in self.losses.items():
            if name == 'l_guide':
                lr_target = self.to_network(self.required_target('lq', 'the bicubic LR: set ir_scale in the dataset'))
                loss_dict[name] = loss(out['LR'], lr_target)
            else:
                loss_dict[name] = loss(out['re_quant_feat'], out['quant_feat'])
        l_total = sum(loss_dict.values())
        loss_dict['l_total'] = l_total
        if not self.losses_are_finite(loss_dict):
            return
        if not self.backward_and_step(l_total, self.optimizer_g, self.params_g, 'icrm'):
            return
        self.step_succeeded()
        self.log_dict = self.reduce_loss_dict(OrderedDict((k, v.detach()) for k, v in loss_dict.items()))
