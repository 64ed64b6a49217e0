"""Stage 0: training the VQGAN that VQIR later keeps frozen as its generative prior.

The paper downloads taming-transformers' f16 ImageNet VQGAN; this model trains one (or
fine-tunes one from a taming ``.ckpt``) inside the framework, with taming's recipe:

    x (B, 3, H, W) in [-1, 1]  ->  VQGAN  ->  x̂ (B, 3, H, W), codebook loss
    step 1 (autoencoder: encoder, quantiser, decoder, quant convs; optim_g):
        L1 (+ LPIPS) + codebook/commitment + λ · GAN_g(D(x̂)),  λ adaptive at the decoder's last layer
    step 2 (discriminator; optim_d), from iteration ``disc_start`` on:
        hinge(D(x), D(x̂.detach()))

Both steps see the same reconstruction (taming runs the forward twice, once per optimiser,
with identical results). Before ``disc_start`` the GAN terms are off and the discriminator is
neither run nor stepped. The loss itself is :class:`vqir.losses.vqgan_loss.VQGANLoss`.

Validation: the reconstruction ``rec`` of every image (sides that are not multiples of the
downsampling factor are reflect-padded for the network and cropped back), the metrics of
``val.metrics`` (e.g. PSNR/SSIM of ``rec`` vs ``gt``), and the codebook usage over the whole
set (perplexity, fraction of codes used) as extra mean columns.
"""
from collections import OrderedDict

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from vqir.metrics.codebook_metric import CodebookUsageAccumulator
from vqir.models.base_model import VQIRBaseModel
from vqir.models.codebook_restart import DeadCodeRestart, check_restart_interval
from vqir.utils.checkpoint import load_weights
from vqir.utils.img_util import pad_to_multiple
from vqir.utils.options import OptionsError

__all__ = ['VQGANModel']

# Where a taming ``.ckpt`` keeps the discriminator (its loss module owns it).
TAMING_DISCRIMINATOR_PREFIX = 'loss.discriminator.'


@MODEL_REGISTRY.register()
class VQGANModel(VQIRBaseModel):
    """VQGAN training (stage 0).

    Options:
        network_g: the VQGAN (``type: VQGAN``).
        network_d: the discriminator, training only (``PatchGANDiscriminator`` as taming, or
            basicsr's ``UNetDiscriminatorSN``).
        path.pretrain_network_g: our ``net_g_*.pth``, a reference ``.pth`` or a taming ``.ckpt``
            (its ``loss.*`` entries are dropped by the loader, which logs how many).
        path.pretrain_network_d: our ``net_d_*.pth`` or a taming ``.ckpt`` (its
            ``loss.discriminator.*`` entries are taken).
        train.vqgan_loss_opt: ``type: VQGANLoss`` with ``disc_start``, weights, ``gan_type``.
        train.optim_g, train.optim_d: the two optimisers (taming: Adam, betas (0.5, 0.9)).
        train.mixed_precision: ``bf16`` runs the VQGAN (but its codebook search), the LPIPS
            backbone and the discriminator under autocast; ``fp16`` is refused here (see __init__).
        train.codebook_restart_every: N > 0 re-initialises, every N iterations, the codes that no
            position chose in those N iterations with encoder outputs of the batch (see
            :mod:`vqir.models.codebook_restart`); off when absent (taming has no restarts).

    Logged: l_rec (L1), l_lowpass (with ``lowpass_weight``: the block-mean L1), l_p (LPIPS, when
    perceptual_weight > 0), l_codebook, l_g_gan, d_weight, l_d (0 while the discriminator is off,
    so that every logged row has the same columns), the perplexity of the codes of the batch and,
    with restarts, codes_restarted.
    """

    default_saved_outputs = ('rec', )
    train_keys = ('codebook_restart_every', )

    @classmethod
    def check_options(cls, opt, opt_path):
        restart = (opt.get('train') or {}).get('codebook_restart_every')
        if restart is not None:
            try:
                check_restart_interval(restart)
            except ValueError as err:
                raise OptionsError(f'{opt_path}: option train:{err}') from None

    @classmethod
    def image_names(cls, opt=None):
        return ('rec', 'gt')

    def __init__(self, opt):
        super().__init__(opt)
        if self.autocast_dtype is torch.float16:
            raise OptionsError(f'{opt.get("opt_path", "options")}: train:mixed_precision fp16 is not supported in '
                               'stage 0: the adaptive GAN weight differentiates unscaled losses, whose fp16 gradients '
                               'can underflow; use bf16')
        self.net_g = self.model_to_device(build_network(opt['network_g']))
        self.load_pretrained(self.net_g, 'g')
        self.saved_networks['net_g'] = self.net_g
        vqgan = self.get_bare_model(self.net_g)
        self.n_embed = vqgan.quantize.n_e
        self.size_multiple = vqgan.downsample_factor
        # forward() returns (rec, codebook loss) only; the quantiser's statistics of the same
        # pass are picked up here, so training can call the (possibly DDP-wrapped) forward.
        self._last_quantizer_info = None
        self._last_quantizer_input = None
        vqgan.quantize.register_forward_hook(self._remember_quantizer_info)
        self.codebook_usage = None  # a CodebookUsageAccumulator while a validation runs
        self.last_codebook_usage = None
        self.code_restart = None  # a DeadCodeRestart in training with train.codebook_restart_every
        if self.is_train:
            self.init_training_settings()

    def _remember_quantizer_info(self, module, inputs, outputs):
        self._last_quantizer_input = inputs[0]
        self._last_quantizer_info = outputs[2]  # (perplexity, None, indices)

    def _required_option(self, *keys):
        node = self.opt
        for depth, key in enumerate(keys):
            if not isinstance(node, dict) or node.get(key) is None:
                raise OptionsError(f'{self.opt.get("opt_path", "options")}: option {":".join(keys[:depth + 1])} '
                                   f'is required by {type(self).__name__}')
            node = node[key]
        return node

    # ------------------------------------------------------------------ training set-up
    def init_training_settings(self):
        self.net_g.train()
        self.net_d = self.model_to_device(build_network(self._required_option('network_d')))
        self.load_discriminator()
        self.saved_networks['net_d'] = self.net_d
        self.net_d.train()

        self.cri_vqgan = build_loss(self._required_option('train', 'vqgan_loss_opt')).to(self.device)

        # taming's opt_ae: encoder, decoder, quantize, quant_conv, post_quant_conv (all of the VQGAN)
        self.params_g = [p for p in self.get_bare_model(self.net_g).parameters() if p.requires_grad]
        self.params_d = [p for p in self.get_bare_model(self.net_d).parameters() if p.requires_grad]
        self._required_option('train', 'optim_g')
        self._required_option('train', 'optim_d')
        self.optimizer_g = self.build_optimizer('optim_g', self.params_g)
        self.optimizer_d = self.build_optimizer('optim_d', self.params_d)
        self.setup_schedulers()

        restart_every = self.opt['train'].get('codebook_restart_every')
        if restart_every:
            self.code_restart = DeadCodeRestart(self.get_bare_model(self.net_g).quantize, restart_every)

    def extra_training_state(self):
        if self.code_restart is None:
            return {}
        return {'codebook_restart': self.code_restart.state_dict()}  # sums the counts over processes

    def resume_extra_training_state(self, resume_state):
        if self.code_restart is not None and resume_state.get('codebook_restart') is not None:
            self.code_restart.load_state_dict(resume_state['codebook_restart'])

    def load_discriminator(self):
        """``path.pretrain_network_d``: our ``net_d_*.pth`` or the discriminator inside a taming ``.ckpt``."""
        path_opt = self.opt['path']
        load_path = path_opt.get('pretrain_network_d')
        if load_path is None:
            return
        load_weights(self.get_bare_model(self.net_d), load_path, strict=path_opt.get('strict_load_d', True),
                     param_key=path_opt.get('param_key_d', 'auto'), key_map={TAMING_DISCRIMINATOR_PREFIX: ''},
                     logger=get_root_logger())

    def gan_is_on(self, current_iter):
        return self.cri_vqgan.gan_factor(current_iter) > 0

    # ------------------------------------------------------------------ training step
    def feed_data(self, data):
        self.gt = data['gt'].to(self.device)

    def _set_requires_grad(self, params, flag):
        for p in params:
            p.requires_grad_(flag)

    def optimize_parameters(self, current_iter):
        x = self.to_network(self.gt)
        gan_on = self.gan_is_on(current_iter)

        # autoencoder step; the discriminator only judges, it gets no gradients here
        self._set_requires_grad(self.params_d, False)
        with self.autocast():  # the codebook search stays float32 (VectorQuantizer)
            rec, codebook_loss = self.net_g(x)
            logits_fake = self.net_d(rec).float() if gan_on else None
            rec = rec.float()
            l_g, g_log = self.cri_vqgan.generator_loss(x, rec, codebook_loss.float(), logits_fake, current_iter,
                                                       last_layer=self.get_bare_model(self.net_g).get_last_layer())
        perplexity = self._last_quantizer_info[0].detach()
        loss_dict = OrderedDict(l_rec=g_log['l_pix'])
        if self.cri_vqgan.lowpass_weight > 0:
            loss_dict['l_lowpass'] = g_log['l_lowpass']
        if self.cri_vqgan.perceptual is not None:
            loss_dict['l_p'] = g_log['l_percep']
        loss_dict.update(l_codebook=g_log['l_codebook'], l_g_gan=g_log['l_g_gan'], d_weight=g_log['d_weight'],
                         l_d=torch.zeros((), device=self.device), perplexity=perplexity)
        if not self.losses_are_finite(dict(loss_dict, l_g_total=l_g)):
            return
        if not self.backward_and_step(l_g, self.optimizer_g, self.params_g, 'net_g'):
            return

        # discriminator step, on the reconstruction of the same forward pass
        if gan_on:
            self._set_requires_grad(self.params_d, True)
            with self.autocast():
                logits_real, logits_fake = self.net_d(x).float(), self.net_d(rec.detach()).float()
            l_d, d_log = self.cri_vqgan.discriminator_loss(logits_real, logits_fake, current_iter)
            loss_dict['l_d'] = d_log['l_d']
            if not self.losses_are_finite({'l_d': l_d}):
                return
            if not self.backward_and_step(l_d, self.optimizer_d, self.params_d, 'net_d'):
                return
        if self.code_restart is not None:
            restarted = self.code_restart.update(self._last_quantizer_input, self._last_quantizer_info[2])
            loss_dict['codes_restarted'] = torch.tensor(float(restarted), device=self.device)
        self.step_succeeded()
        self.log_dict = self.reduce_loss_dict(loss_dict)

    # ------------------------------------------------------------------ inference
    def test(self):
        """Reconstruction of ``self.gt``: self.output = {'rec'}, self.targets = {'gt'}, (1, 3, H, W) in [0, 1]."""
        vqgan = self.get_bare_model(self.net_g)
        was_training = vqgan.training
        vqgan.eval()
        with torch.no_grad():
            x = self.to_network(self.gt)
            h, w = x.shape[-2:]
            quant, _, (_, _, indices) = vqgan.encode(pad_to_multiple(x, self.size_multiple))
            rec = vqgan.decode(quant)[..., :h, :w]
        vqgan.train(was_training)
        if self.codebook_usage is not None:
            self.codebook_usage.update(indices)
        self.output = {'rec': self.from_network(rec)}
        self.targets = {'gt': self.gt}

    # ------------------------------------------------------------------ validation
    def begin_validation(self):
        self.codebook_usage = CodebookUsageAccumulator(self.n_embed)

    def dataset_metrics(self):
        """Codebook usage over the whole validation set (the codes of all images pooled)."""
        usage = self.codebook_usage.result()
        self.codebook_usage = None
        self.last_codebook_usage = OrderedDict([('codebook_perplexity', usage['perplexity']),
                                                ('codebook_used_fraction', usage['used_fraction'])])
        return self.last_codebook_usage
