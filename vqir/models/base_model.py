"""What every vqir model shares, on top of basicsr's ``BaseModel``.

basicsr's ``BaseModel`` assumes CUDA in several places (DDP device ids, resume, saving) and
knows only Adam. ``VQIRBaseModel`` fixes that in one place and adds what the stage models share:
- the image convention of the networks: [0,1] RGB from the datasets <-> [-1,1] for the networks
  (``network_color: bgr`` flips channels to reproduce the reference's stage-1 quirk);
- checkpoint I/O through ``vqir.utils.checkpoint`` (weights_only loads, atomic writes) and
  training states that also hold the RNG states (``get_rng_state`` there), so a resumed run
  continues the same curve;
- a guard against non-finite losses and gradients, and optional gradient clipping;
- mixed-precision training (``train.mixed_precision``: ``bf16`` or ``fp16``): subclasses run
  their forward passes and losses under ``self.autocast()``; with fp16 each optimiser gets a
  ``torch.amp.GradScaler`` (its state is part of the training state);
- one validation loop for all stages (:mod:`vqir.models.validation`).
"""
from collections import OrderedDict
from contextlib import nullcontext
from os import path as osp

import torch
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger
from torch.nn.parallel import DataParallel, DistributedDataParallel

from vqir.models.validation import ValidationMixin
from vqir.utils.checkpoint import (CheckpointError, atomic_torch_save, get_rng_state, load_weights, save_state_dict,
                                   set_rng_state)
from vqir.utils.dist import barrier, is_distributed, master_only
from vqir.utils.errors import InputError
from vqir.utils.img_util import check_network_color, from_network, to_network
from vqir.utils.options import MIXED_PRECISION, OptionsError


class NonFiniteLossError(InputError, RuntimeError):
    """Raised after too many consecutive training steps with a non-finite loss or gradient; the message
    names the losses and what to lower, which is all a traceback would add."""


class VQIRBaseModel(ValidationMixin, BaseModel):
    """Base of the stage models. Subclasses build ``self.net_g`` (and others), fill
    ``self.output`` in ``test()``, and list what ``save()`` writes in ``self.saved_networks``."""

    def __init__(self, opt):
        super().__init__(opt)
        if opt['num_gpu'] != 0 and torch.cuda.is_available():
            self.device = torch.device('cuda', torch.cuda.current_device())
        else:
            self.device = torch.device('cpu')
        self.network_color = opt.get('network_color', 'rgb')
        try:
            check_network_color(self.network_color)
        except ValueError as err:
            raise OptionsError(f'{opt.get("opt_path", "options")}: option {err}') from None
        self.log_dict = OrderedDict()
        self.saved_networks = OrderedDict()  # label -> network, written by save()
        self.ema = None  # ModelEMA of net_g with train.ema_decay: saved as params_ema in net_g's file
        self.best_metrics = OrderedDict()  # '<val set>/<metric>' -> {'value', 'iter'}; in the training state
        self.wandb_id = None  # id of the run's W&B run (logger.wandb), kept in the training state
        self.output = {}
        self._bad_steps = 0
        self.autocast_dtype = self._mixed_precision_dtype()
        self.grad_scalers = OrderedDict()  # optimised part -> GradScaler (fp16 only), made at its first step

    # train: and val: keys that this model reads besides the generic ones of vqir.utils.options
    # (KNOWN_TRAIN_KEYS, KNOWN_VAL_KEYS), and top-level keys that only some models read; their
    # values are checked by check_options
    train_keys = ()
    val_keys = ()
    top_level_keys = ()

    @classmethod
    def check_options(cls, opt, opt_path):
        """Hook of ``vqir.utils.options.check_components``: raise OptionsError (naming ``opt_path`` and
        the key) for a value of one of the model's own options that cannot work, before a run creates
        anything. Nothing to check here."""

    @classmethod
    def image_names(cls, opt=None):
        """Names of the images ``get_current_visuals()`` can give with the options ``opt`` (outputs,
        then targets), which ``val:metrics`` and ``val:outputs`` may name; None when not known."""
        return None

    def _mixed_precision_dtype(self):
        """The autocast dtype of ``train.mixed_precision`` (None for float32 and when testing)."""
        if not self.is_train:
            return None
        name = (self.opt.get('train') or {}).get('mixed_precision') or 'fp32'
        if name not in MIXED_PRECISION:
            raise OptionsError(f'{self.opt.get("opt_path", "options")}: train:mixed_precision must be one of '
                               f'{", ".join(MIXED_PRECISION)}, got {name!r}')
        return MIXED_PRECISION[name]

    def autocast(self):
        """Context for forward passes and losses: autocast to ``train.mixed_precision``, or nothing."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self, name):
        """The GradScaler of the optimised part ``name`` with fp16 (created on first use), else None."""
        if self.autocast_dtype is not torch.float16:
            return None
        if name not in self.grad_scalers:
            self.grad_scalers[name] = torch.amp.GradScaler(self.device.type)
        return self.grad_scalers[name]

    # ------------------------------------------------------------------ image conventions
    def to_network(self, img):
        """(B,3,H,W) RGB in [0,1] -> what the network sees (:func:`vqir.utils.img_util.to_network`)."""
        return to_network(img, self.network_color)

    def from_network(self, x):
        """Network output -> (B,3,H,W) RGB in [0,1] (:func:`vqir.utils.img_util.from_network`)."""
        return from_network(x, self.network_color)

    # ------------------------------------------------------------------ networks and optimisers
    def model_to_device(self, net):
        """Move to the device; wrap in DDP (CPU or GPU) or DataParallel when asked."""
        net = net.to(self.device)
        if self.opt['dist']:
            device_ids = [self.device.index] if self.device.type == 'cuda' else None
            net = DistributedDataParallel(net, device_ids=device_ids,
                                          find_unused_parameters=self.opt.get('find_unused_parameters', False))
        elif self.opt['num_gpu'] > 1:
            net = DataParallel(net)
        return net

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        optim_class = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_class, type) and issubclass(optim_class, torch.optim.Optimizer)):
            raise OptionsError(f'unknown optimizer type "{optim_type}" (any torch.optim optimizer, e.g. Adam, AdamW, SGD)')
        return optim_class(params, lr, **kwargs)

    def build_optimizer(self, key, params):
        """Optimizer from ``train.<key>`` (``type`` + keyword arguments); the options are not mutated."""
        optim_opt = dict(self.opt['train'][key])
        optim_type = optim_opt.pop('type', 'Adam')
        lr = optim_opt.pop('lr')
        params = [p for p in params if p.requires_grad]
        if not params:
            raise OptionsError(f'train.{key}: no trainable parameters to optimise')
        optimizer = self.get_optimizer(optim_type, params, lr, **optim_opt)
        self.optimizers.append(optimizer)
        return optimizer

    def setup_schedulers(self):
        """Like basicsr's, without consuming the options (so a resumed run can build them again)."""
        sched_opt = self.opt['train'].get('scheduler')
        if not sched_opt:
            return
        from basicsr.models import lr_scheduler
        sched_opt = dict(sched_opt)
        sched_type = sched_opt.pop('type')
        classes = {'MultiStepLR': lr_scheduler.MultiStepRestartLR, 'MultiStepRestartLR': lr_scheduler.MultiStepRestartLR,
                   'CosineAnnealingRestartLR': lr_scheduler.CosineAnnealingRestartLR}
        if sched_type not in classes:
            raise OptionsError(f'unknown scheduler type "{sched_type}" (known: {", ".join(classes)})')
        for optimizer in self.optimizers:
            self.schedulers.append(classes[sched_type](optimizer, **sched_opt))

    @staticmethod
    def freeze(module):
        """Frozen parts stay in eval mode and get no gradients."""
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    # ------------------------------------------------------------------ checkpoints
    def load_network(self, net, load_path, strict=True, param_key='auto', drop_prefixes=('loss.',)):
        return load_weights(self.get_bare_model(net), load_path, strict=strict, param_key=param_key,
                            drop_prefixes=drop_prefixes, logger=get_root_logger())

    def load_pretrained(self, net, name, default_strict=True):
        """Load ``path.pretrain_network_<name>`` if set (with ``strict_load_<name>``, ``param_key_<name>``)."""
        path_opt = self.opt['path']
        load_path = path_opt.get(f'pretrain_network_{name}')
        if load_path is None:
            return False
        self.load_network(net, load_path, strict=path_opt.get(f'strict_load_{name}', default_strict),
                          param_key=path_opt.get(f'param_key_{name}', 'auto'))
        return True

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """``<models>/<net_label>_<iter>.pth`` (``latest`` for -1; ``current_iter`` may also be a word such as
        ``best``): ``{param_key: weights}``, plus ``params_ema`` for net_g when an EMA is kept (basicsr's layout)."""
        label = 'latest' if current_iter == -1 else current_iter
        save_path = osp.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        params = {param_key: self.get_bare_model(net).state_dict()}
        if net_label == 'net_g' and self.ema is not None:
            params['params_ema'] = self.ema.state_dict()
        save_state_dict(params, save_path)

    def save_best(self):
        """``<models>/<net_label>_best.pth`` for every saved network: the state that scored best on
        ``val:keep_best`` (validation runs on rank 0 only, so this writes from rank 0 alone)."""
        for label, net in self.saved_networks.items():
            self.save_network(net, label, 'best')

    def save(self, epoch, current_iter):
        extra = self.extra_training_state() if current_iter != -1 else {}  # on every process (see there)
        for label, net in self.saved_networks.items():
            self.save_network(net, label, current_iter)
        self.save_training_state(epoch, current_iter, extra)
        barrier()

    @master_only
    def save_training_state(self, epoch, current_iter, extra=None):
        """Written after the networks and atomically: a present ``<iter>.state`` is always complete.
        ``extra``: what ``extra_training_state`` gave, added to the state."""
        if current_iter == -1:
            return
        state = {
            'epoch': epoch,
            'iter': current_iter,
            'optimizers': [o.state_dict() for o in self.optimizers],
            'schedulers': [s.state_dict() for s in self.schedulers],
            'rng': get_rng_state(),
            'networks': list(self.saved_networks),
            'grad_scalers': OrderedDict((name, scaler.state_dict()) for name, scaler in self.grad_scalers.items()),
            'best_metrics': {k: dict(v) for k, v in self.best_metrics.items()},
        }
        if self.wandb_id is not None:
            state['wandb_id'] = self.wandb_id
        state.update(extra or {})
        atomic_torch_save(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    def resume_training(self, resume_state):
        if len(resume_state['optimizers']) != len(self.optimizers):
            raise CheckpointError(f'training state has {len(resume_state["optimizers"])} optimizers, '
                                  f'this model has {len(self.optimizers)}')
        for optimizer, state in zip(self.optimizers, resume_state['optimizers']):
            optimizer.load_state_dict(state)
        for scheduler, state in zip(self.schedulers, resume_state['schedulers']):
            scheduler.load_state_dict(state)
        if 'rng' in resume_state:
            set_rng_state(resume_state['rng'])
        self.best_metrics = OrderedDict((k, dict(v)) for k, v in (resume_state.get('best_metrics') or {}).items())
        self.resume_extra_training_state(resume_state)
        for name, state in (resume_state.get('grad_scalers') or {}).items():
            scaler = self.grad_scaler(name)
            if scaler is not None:  # a run resumed in another precision starts without loss scaling
                scaler.load_state_dict(state)

    def extra_training_state(self):
        """What a subclass adds to the training state (plain values and tensors). Called on every
        process when a state is saved, so it may gather over processes; process 0 writes it."""
        return {}

    def resume_extra_training_state(self, resume_state):
        """Take back what ``extra_training_state`` wrote (absent in older states)."""

    # ------------------------------------------------------------------ safe optimisation steps
    def losses_are_finite(self, loss_dict):
        """False (and the step must be skipped) when any loss is NaN/inf; stops the run after
        ``train.max_bad_steps`` consecutive bad steps (default 10)."""
        bad = [name for name, value in loss_dict.items() if torch.is_tensor(value) and not torch.isfinite(value).all()]
        if is_distributed():
            # every process must skip the same steps: one that went on to backward would wait
            # forever for the gradients of the others
            flag = torch.tensor(float(bool(bad)), device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not bad:
                bad = ['(on another process)']
        return self._record_step(bad, 'loss')

    @staticmethod
    def _all_finite(params):
        return all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)

    def gradients_are_finite(self, params, name):
        return self._record_step([] if self._all_finite(params) else [name], 'gradient of')

    def _record_step(self, bad, what):
        if not bad:
            return True
        self._bad_steps += 1
        self.log_dict = OrderedDict()  # nothing to log for a skipped step
        limit = self.opt['train'].get('max_bad_steps', 10)
        logger = get_root_logger()
        logger.warning(f'non-finite {what} {", ".join(bad)}: step skipped ({self._bad_steps} in a row, limit {limit})')
        if self._bad_steps >= limit:
            raise NonFiniteLossError(f'{self._bad_steps} consecutive steps with a non-finite {what} {", ".join(bad)}; '
                                     'stopping. The last good checkpoint is kept in '
                                     f'{self.opt["path"].get("models")}')
        return False

    def step_succeeded(self):
        self._bad_steps = 0
        if self.ema is not None:
            self.ema.update()

    def backward_and_step(self, loss, optimizer, params, name):
        """Backward, check gradients, clip (``train.grad_clip_norm``), step. Returns False if skipped.

        With fp16 the loss is scaled by the part's GradScaler and the gradients unscaled before
        the check. An overflow of the scaled gradients is the scaler's normal way of finding its
        scale: the step is skipped and the scale lowered, without counting as a bad step, as
        long as the scale is at least 1 (below that the gradients themselves are not finite).
        """
        optimizer.zero_grad(set_to_none=True)
        scaler = self.grad_scaler(name)
        (loss if scaler is None else scaler.scale(loss)).backward()
        params = [p for p in params if p.requires_grad]
        if scaler is not None:
            scaler.unscale_(optimizer)
            if scaler.get_scale() >= 1 and not self._all_finite(params):
                scaler.update()  # lowers the scale
                optimizer.zero_grad(set_to_none=True)
                self.log_dict = OrderedDict()
                return False
        if not self.gradients_are_finite(params, name):
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()
            return False
        clip = self.opt['train'].get('grad_clip_norm')
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        return True
