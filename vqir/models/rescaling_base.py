"""What the two VQIR training stages share: the network, its frozen parts, data and inference.

Both stages train one part of the same ``VQIR`` network and keep the rest frozen:

    stage 1 (``VQIRModel``)    trains ``icrm`` (the IFRM);   VQGAN frozen
    stage 2 (``VQIRRFModel``)  trains ``refine`` (the MSRM); VQGAN and IFRM frozen

Options read here (besides the base class's):
    network_g: the ``VQIR`` network (``stage`` must match the model). The reference calls this
        block ``network_ir``; either name is accepted, not both. Saved as ``net_g``.
    path.pretrain_network_vqgan: VQGAN weights for the frozen prior: a taming ``.ckpt``, a VQIR
        ``.pth`` (official or ours) or a stage-0 ``net_g_*.pth``. Only the VQGAN parts (encoder,
        decoder, quantize, quant_conv, post_quant_conv) are read, strictly (``strict_load_vqgan``,
        default true); other entries (``loss.*``, ``icrm.*``, ``refine.*``) are dropped and logged.
    path.pretrain_network_g: a whole VQIR state (``strict_load_g``, ``param_key_g``), loaded after
        the VQGAN file, so it wins where both have a part (e.g. on resume). Parts listed in the
        stage's ``parts_a_checkpoint_may_lack`` (stage 2: ``refine``, for stage-1 checkpoints)
        may be absent as a whole in training; that is logged. Testing needs every weight.
        ``pretrain_network_ir`` / ``strict_load_ir`` / ``param_key_ir`` are read as aliases when
        the ``_g`` key is not set.
    inference: {tile, tile_overlap, size_mode, half, bf16, compile, ...}: how ``test()`` runs the network
        (see :class:`vqir.inference.Rescaler`); default: pad any size, tile only huge images.
    network_color: 'rgb' (default) or 'bgr' (the reference's stage-1 channel order).
    train.ema_decay: keep an exponential moving average of the trained weights (e.g. 0.999; 0 or
        absent: none), saved as ``params_ema`` beside ``params`` and used by validation; see
        :mod:`vqir.models.ema`.

Batches (datasets' keys, RGB in [0, 1]): ``gt`` (HR), ``lq`` (bicubic HR↓s), ``gt_level2``,
``gt_level4`` (bicubic HR↓2, ↓4). They are kept in ``self.targets`` for validation.
"""
import types
from collections import Counter, OrderedDict

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from torch import nn

from vqir.inference import Rescaler, check_inference_options
from vqir.models.base_model import VQIRBaseModel
from vqir.models.ema import ModelEMA
from vqir.models.lr_jpeg import LRJPEG, check_lr_jpeg_options, real_jpeg
from vqir.utils.checkpoint import CheckpointError, load_state_dict
from vqir.utils.options import OptionsError

__all__ = ['RescalingModel', 'VQGAN_PARTS', 'vqgan_parts', 'freeze_in_eval', 'PartsView']

# Top-level parts of VQIR that form the VQGAN prior (taming's VQModel without its loss).
VQGAN_PARTS = ('encoder', 'decoder', 'quantize', 'quant_conv', 'post_quant_conv')


def vqgan_parts(net):
    """The parts of ``net`` that come from the VQGAN prior: ``VQGAN_PARTS``, and the block-colour
    path of a prior trained with one (VQGAN's ``colour_path``)."""
    return VQGAN_PARTS + (('colour_path', ) if getattr(net, 'colour_path', None) is not None else ())


# Dataset keys that the stages use as targets.
TARGET_KEYS = ('gt', 'lq', 'gt_level2', 'gt_level4')


def _train_keeping_eval(module, mode=True):
    """``nn.Module.train`` of a frozen part: whatever is asked, the part stays in eval mode."""
    return nn.Module.train(module, False)


def freeze_in_eval(module):
    """Freeze ``module`` (no gradients, eval mode) so that it stays in eval mode even when its
    owner's ``train()`` is called (its ``train`` is replaced on this instance)."""
    VQIRBaseModel.freeze(module)
    module.train = types.MethodType(_train_keeping_eval, module)
    return module


class PartsView(nn.Module):
    """A module that holds some top-level parts of a network (shared, not copied), so that a
    checkpoint can be loaded into just those parts: its state_dict keys are the network's."""

    def __init__(self, net, parts):
        super().__init__()
        for part in parts:
            self.add_module(part, getattr(net, part))


class RescalingModel(VQIRBaseModel):
    """Base of the VQIR stage models: see the module docstring.

    Subclasses set the class attributes below and implement ``init_training_settings`` and
    ``optimize_parameters``.
    """

    stage = None
    train_keys = ('ema_decay', 'lr_jpeg')
    val_keys = ('lr_jpeg_quality', )
    top_level_keys = ('inference', 'ir_scale')
    trainable_parts = ()  # top-level parts of VQIR that learn
    parts_a_checkpoint_may_lack = ()  # parts that pretrain_network_g may lack as a whole
    output_keys = ()  # reconstructions kept by test(), besides 'LR'
    default_saved_outputs = ()  # images written by validation

    @classmethod
    def image_names(cls, opt=None):
        return ('LR', ) + cls.kept_outputs(opt) + TARGET_KEYS

    @classmethod
    def kept_outputs(cls, opt):
        """The reconstructions ``test()`` keeps: ``output_keys``, and in stage 2 the VQGAN decoder's
        own image ``SR`` when ``inference: decoder_image`` asks for it."""
        decoder_image = cls.stage == 2 and bool(((opt or {}).get('inference') or {}).get('decoder_image'))
        return tuple(cls.output_keys) + (('SR', ) if decoder_image else ())

    def __init__(self, opt):
        super().__init__(opt)
        self.logger = get_root_logger()
        net = build_network(self.network_options())
        if getattr(net, 'stage', None) != self.stage:
            raise OptionsError(f'{self.opt.get("opt_path", "options")}: {type(self).__name__} trains stage {self.stage}, '
                               f'but the network is stage {getattr(net, "stage", None)!r} (set stage: {self.stage} in '
                               f'{self.network_key})')
        if self.opt.get('ir_scale') is not None and self.opt['ir_scale'] != net.ir_scale:
            raise OptionsError(f'{self.opt.get("opt_path", "options")}: ir_scale {self.opt["ir_scale"]} differs from '
                               f'{self.network_key}:ir_scale {net.ir_scale}')
        self.ir_scale = net.ir_scale
        self.load_rescaling_weights(net)
        for name, part in net.named_children():
            if name not in self.trainable_parts:
                freeze_in_eval(part)
        self.log_parameter_counts(net)
        self.net_g = self.model_to_device(net)
        self.saved_networks['net_g'] = self.net_g
        ema_decay = self.opt['train'].get('ema_decay', 0) if self.is_train else 0
        if ema_decay:
            self.ema = ModelEMA(net, ema_decay)
            self.resume_ema()
        self.targets = OrderedDict()
        self._rescaler = None
        self.val_lr_jpeg_quality = self.val_lr_jpeg_quality_of(self.opt, self.opt.get('opt_path', 'options'))
        if self.is_train:
            self.net_g.train()
            self.init_training_settings()
        else:
            self.net_g.eval()

    # ------------------------------------------------------------------ network and weights
    def resume_ema(self):
        """A resumed run takes its EMA back from ``params_ema`` of the checkpoint that ``net_g`` came
        from (``params``); any other run starts its EMA from the weights ``net_g`` loaded."""
        g_path = self._path_option('pretrain_network')
        if self.opt['path'].get('resume_state') and g_path is not None:
            self.ema.load_state_dict(load_state_dict(g_path, param_key='params_ema'))

    @property
    def evaluated_net(self):
        """What validation and test run: the EMA of the weights when one is kept."""
        return self.ema.net if self.ema is not None else self.bare_net

    @property
    def network_key(self):
        """'network_g', or the reference's name 'network_ir'."""
        present = [key for key in ('network_g', 'network_ir') if key in self.opt]
        if len(present) != 1:
            what = 'both' if present else 'neither'
            raise OptionsError(f'{self.opt.get("opt_path", "options")}: {type(self).__name__} needs the VQIR network '
                               f'in network_g (or the reference\'s name network_ir); {what} given')
        return present[0]

    def network_options(self):
        return self.opt[self.network_key]

    def _path_option(self, key, default=None):
        """``path.<key>_g``, else the reference's ``path.<key>_ir``, else ``default``."""
        path_opt = self.opt['path']
        for suffix in ('g', 'ir'):
            if path_opt.get(f'{key}_{suffix}') is not None:
                return path_opt[f'{key}_{suffix}']
        return default

    def load_rescaling_weights(self, net):
        """VQGAN prior from ``pretrain_network_vqgan``, then a whole state from ``pretrain_network_g``."""
        path_opt = self.opt['path']
        vqgan_path = path_opt.get('pretrain_network_vqgan')
        if vqgan_path is not None:
            parts = vqgan_parts(net)
            self.load_network(PartsView(net, parts), vqgan_path, strict=path_opt.get('strict_load_vqgan', True),
                              param_key=path_opt.get('param_key_vqgan', 'auto'))
            others = ', '.join(f'{name}.*' for name, _ in net.named_children() if name not in parts)
            self.logger.info(f'{vqgan_path}: VQGAN prior loaded; not read from it: {others}')
        g_path = self._path_option('pretrain_network')
        if g_path is not None:
            self.load_whole_state(net, g_path, strict=self._path_option('strict_load', True),
                                  param_key=self._path_option('param_key', 'auto'))
        elif not self.is_train:
            self.logger.warning('no path.pretrain_network_g: testing with untrained ' + ', '.join(self.trainable_parts))

    def load_whole_state(self, net, load_path, strict, param_key):
        """Load a VQIR state. With ``strict``, every difference is an error except parts of
        ``parts_a_checkpoint_may_lack`` that the file lacks altogether (logged)."""
        report = self.load_network(net, load_path, strict=False, param_key=param_key)
        own_by_part = Counter(k.split('.')[0] for k in net.state_dict() if not k.endswith('num_batches_tracked'))
        missing_by_part = Counter(k.split('.')[0] for k in report.missing)
        # only training may start a part from scratch; a test needs every weight
        may_lack = self.parts_a_checkpoint_may_lack if self.is_train else ()
        file_lacks = sorted(part for part in may_lack if missing_by_part[part] == own_by_part[part] > 0)
        for part in file_lacks:
            self.logger.info(f'{load_path}: has no {part}.* entries (a stage-{self.stage - 1} checkpoint): '
                             f'{part} starts from its initialisation')
        missing = [k for k in report.missing if k.split('.')[0] not in file_lacks]
        if strict and (missing or report.unexpected or report.mismatched):
            hint = ''
            if missing and all(k.startswith('icrm.') for k in missing):
                hint = ' (a VQGAN checkpoint belongs in path.pretrain_network_vqgan)'
            shown = ', '.join(missing[:5]) + (', ...' if len(missing) > 5 else '')
            raise CheckpointError(
                f'{load_path}: not a stage-{self.stage} VQIR state for this network{hint}: '
                f'{len(missing)} missing ({shown}), {len(report.unexpected)} unexpected, '
                f'{len(report.mismatched)} mis-shaped keys (strict_load_g: false loads what matches)')
        return report

    def log_parameter_counts(self, net):
        parts = OrderedDict((name, sum(p.numel() for p in part.parameters())) for name, part in net.named_children())
        trainable = [f'{n} {c:,}' for n, c in parts.items() if n in self.trainable_parts]
        frozen = [f'{n} {c:,}' for n, c in parts.items() if n not in self.trainable_parts]
        self.logger.info(f'Network VQIR (stage {self.stage}, {self.ir_scale}x): {sum(parts.values()):,} parameters; '
                         f'trained: {", ".join(trainable)}; frozen: {", ".join(frozen)}')

    @property
    def bare_net(self):
        return self.get_bare_model(self.net_g)

    def trainable_parameters(self):
        net = self.bare_net
        return [p for part in self.trainable_parts for p in getattr(net, part).parameters() if p.requires_grad]

    def build_loss_if_weighted(self, key):
        """The loss of ``train.<key>``, or None when the key is absent or its ``loss_weight`` is 0."""
        loss_opt = self.opt['train'].get(key)
        if not loss_opt:
            return None
        if loss_opt.get('loss_weight', 1) == 0:
            self.logger.info(f'train.{key}: loss_weight 0, not built')
            return None
        return build_loss(dict(loss_opt)).to(self.device)

    # ------------------------------------------------------------------ data
    def feed_data(self, data):
        """Keep the batch's targets (RGB, [0, 1]) on the device: ``self.gt`` and ``self.targets``."""
        if 'gt' not in data:
            raise KeyError(f'{type(self).__name__} needs HR images under the key "gt"; the batch has {sorted(data)}')
        self.targets = OrderedDict((key, data[key].to(self.device)) for key in TARGET_KEYS if key in data)
        self.gt = self.targets['gt']

    def required_target(self, key, hint):
        if key not in self.targets:
            raise KeyError(f'{type(self).__name__} training needs "{key}" in every batch ({hint}); '
                           f'the batch has {sorted(self.targets)}')
        return self.targets[key]

    @classmethod
    def check_options(cls, opt, opt_path):
        """What only the rescaling models read: ``train:ema_decay``, ``train:lr_jpeg``,
        ``val:lr_jpeg_quality`` and the ``inference`` block (at the network's scale)."""
        try:
            ModelEMA.check_decay((opt.get('train') or {}).get('ema_decay', 0))
        except ValueError as err:
            raise OptionsError(f'{opt_path}: option train:{err}') from None
        cls.lr_jpeg_options(opt, opt_path)
        cls.val_lr_jpeg_quality_of(opt, opt_path)
        networks = [opt[key] for key in ('network_g', 'network_ir') if isinstance(opt.get(key), dict)]
        ir_scale = networks[0].get('ir_scale', 16) if networks else 16
        if ir_scale in (16, 32):  # another scale is the network's to refuse
            check_inference_options(opt, opt_path, ir_scale)

    @staticmethod
    def lr_jpeg_options(opt, opt_path):
        """``train.lr_jpeg`` as (low, high, prob), None without it; OptionsError when invalid."""
        block = (opt.get('train') or {}).get('lr_jpeg')
        if block is None:
            return None
        try:
            return check_lr_jpeg_options(block)
        except ValueError as err:
            raise OptionsError(f'{opt_path}: option train:lr_jpeg: {err}') from None

    @staticmethod
    def val_lr_jpeg_quality_of(opt, opt_path):
        """``val.lr_jpeg_quality``: the JPEG quality validation and test pass the LR through (None: PNG)."""
        quality = (opt.get('val') or {}).get('lr_jpeg_quality')
        if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100):
            raise OptionsError(f'{opt_path}: option val:lr_jpeg_quality must be an integer from 1 to 100, '
                               f'got {quality!r}')
        return quality

    def lr_jpeg_channel(self, differentiable):
        """``train.lr_jpeg`` as a function of the network-space LR (None without the option); see
        :mod:`vqir.models.lr_jpeg`."""
        options = self.lr_jpeg_options(self.opt, self.opt.get('opt_path', 'options'))
        if options is None:
            return None
        low, high, prob = options
        jpeg = LRJPEG((low, high), prob, differentiable=differentiable)
        return lambda lr: self.to_network(jpeg(self.from_network(lr)))

    # ------------------------------------------------------------------ inference
    @property
    def rescaler(self):
        """The :class:`vqir.inference.Rescaler` of this network, from the ``inference`` options."""
        if self._rescaler is None:
            inference_opt = check_inference_options(self.opt, self.opt.get('opt_path', 'options'), self.ir_scale)
            try:
                self._rescaler = Rescaler(self.evaluated_net, ir_scale=self.ir_scale,
                                          network_color=self.network_color, **inference_opt)
            except ValueError as err:
                raise OptionsError(f'{self.opt.get("opt_path", "options")}: option inference: {err}') from None
        return self._rescaler

    def test(self):
        """Downscale ``self.gt`` to its 8-bit LR and rebuild it (any size; see the Rescaler).

        With ``val.lr_jpeg_quality`` the LR goes through a real JPEG of that quality first, and
        ``LR`` is the decoded JPEG the upscaler received.

        ``self.output``: ``LR`` (B, 3, ceil(H/s), ceil(W/s)) and the stage's ``output_keys``, RGB
        in [0, 1] (unclamped), on the device. With ``inference.size_mode: mod_crop`` the outputs
        cover the HR cropped to a multiple of s, and the targets are cropped alike (give the
        dataset ``mod_crop: true`` too, so that ``lq`` is computed from the cropped HR).
        """
        lr = self.rescaler.downscale(self.gt)
        if self.val_lr_jpeg_quality:
            lr = real_jpeg(lr, self.val_lr_jpeg_quality)  # what a shared LR decodes to
        outputs = self.rescaler.upscale(lr, out_size=self.rescaler.output_size(*self.gt.shape[-2:]))
        self.output = OrderedDict(LR=lr)
        self.output.update((key, outputs[key]) for key in self.kept_outputs(self.opt))
        if self.rescaler.size_mode == 'mod_crop':
            height, width = self.rescaler.network_size(*self.gt.shape[-2:])
            factors = {'gt': 1, 'lq': self.ir_scale, 'gt_level2': 2, 'gt_level4': 4}
            for key, value in self.targets.items():
                f = factors[key]
                self.targets[key] = value[..., :-(-height // f), :-(-width // f)]
