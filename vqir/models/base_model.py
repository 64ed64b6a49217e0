"""What every vqir model shares, on top of basicsr's ``BaseModel``.

basicsr's ``BaseModel`` assumes CUDA in several places (DDP device ids, resume, saving) and
knows only Adam. ``VQIRBaseModel`` fixes that in one place and adds what the stage models share:
- the image convention of the networks: [0,1] RGB from the datasets <-> [-1,1] for the networks
  (``network_color: bgr`` flips channels to reproduce the reference's stage-1 quirk);
- checkpoint I/O through ``vqir.utils.checkpoint`` (weights_only loads, atomic writes) and
  training states that also hold the RNG states, so a resumed run continues the same curve;
- a guard against non-finite losses and gradients, and optional gradient clipping;
- mixed-precision training (``train.mixed_precision``: ``bf16`` or ``fp16``): subclasses run
  their forward passes and losses under ``self.autocast()``; with fp16 each optimiser gets a
  ``torch.amp.GradScaler`` (its state is part of the training state);
- one validation loop for all stages: metrics from ``val.metrics`` (each names the output and
  target it compares), images saved per output, a metrics CSV per dataset and a printed table.
"""
import csv
import io
import math
import os
import random
from collections import OrderedDict
from contextlib import nullcontext
from os import path as osp

import numpy as np
import torch
from basicsr.metrics import calculate_metric
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger, tensor2img
from torch.nn.parallel import DataParallel, DistributedDataParallel
from tqdm import tqdm

from vqir.metrics.fid_metric import InceptionFeatureSets
from vqir.utils.atomic_file import atomic_write_bytes
from vqir.utils.checkpoint import CheckpointError, atomic_torch_save, load_weights, save_state_dict
from vqir.utils.dist import barrier, is_distributed, master_only
from vqir.utils.errors import InputError
from vqir.utils.image_io import write_image
from vqir.utils.hub_weights import WeightsNotFoundError
from vqir.utils.options import METRIC_ROUTING_KEYS, MIXED_PRECISION, OptionsError, check_metric_weights


class NonFiniteLossError(InputError, RuntimeError):
    """Raised after too many consecutive training steps with a non-finite loss or gradient; the message
    names the losses and what to lower, which is all a traceback would add."""


def get_rng_state():
    """All RNG states that drive training, as tensors and plain numbers (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        'random': random.getstate(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state['random']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


class VQIRBaseModel(BaseModel):
    """Base of the stage models. Subclasses build ``self.net_g`` (and others), fill
    ``self.output`` in ``test()``, and list what ``save()`` writes in ``self.saved_networks``."""

    def __init__(self, opt):
        super().__init__(opt)
        if opt['num_gpu'] != 0 and torch.cuda.is_available():
            self.device = torch.device('cuda', torch.cuda.current_device())
        else:
            self.device = torch.device('cpu')
        self.network_color = opt.get('network_color', 'rgb')
        if self.network_color not in ('rgb', 'bgr'):
            raise OptionsError(f"network_color must be 'rgb' or 'bgr', got {self.network_color!r}")
        self.log_dict = OrderedDict()
        self.saved_networks = OrderedDict()  # label -> network, written by save()
        self.ema = None  # ModelEMA of net_g with train.ema_decay: saved as params_ema in net_g's file
        self.best_metrics = OrderedDict()  # '<val set>/<metric>' -> {'value', 'iter'}; in the training state
        self.wandb_id = None  # id of the run's W&B run (logger.wandb), kept in the training state
        self.output = {}
        self._bad_steps = 0
        self.autocast_dtype = self._mixed_precision_dtype()
        self.grad_scalers = OrderedDict()  # optimised part -> GradScaler (fp16 only), made at its first step

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
        """(B,3,H,W) RGB in [0,1] -> what the network sees: [-1,1], RGB (or BGR if asked)."""
        x = img * 2 - 1
        return x.flip(1) if self.network_color == 'bgr' else x

    def from_network(self, x):
        """Network output in [-1,1] -> (B,3,H,W) RGB in [0,1] (not clamped; saving clamps)."""
        x = x.flip(1) if self.network_color == 'bgr' else x
        return (x + 1) / 2

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

    def get_bare_model(self, net):
        if isinstance(net, (DataParallel, DistributedDataParallel)):
            net = net.module
        return net

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
        """``<models>/<net_label>_<iter>.pth``: ``{param_key: weights}``, plus ``params_ema`` for net_g
        when an EMA is kept (basicsr's layout)."""
        label = 'latest' if current_iter == -1 else current_iter
        save_path = osp.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        params = {param_key: self.get_bare_model(net).state_dict()}
        if net_label == 'net_g' and self.ema is not None:
            params['params_ema'] = self.ema.state_dict()
        save_state_dict(params, save_path)

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

    # ------------------------------------------------------------------ validation
    def get_current_visuals(self):
        """Every output and target of the last ``test()`` as (1,3,h,w) RGB tensors in [0,1] on the CPU."""
        visuals = OrderedDict()
        for key, value in self.output.items():
            visuals[key] = value.detach().float().cpu()
        for key, value in getattr(self, 'targets', {}).items():
            visuals[key] = value.detach().float().cpu()
        return visuals

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        # Validation runs on rank 0 only, on the bare network, so no collective op can hang.
        if self.opt['rank'] == 0:
            self.nondist_validation(dataloader, current_iter, tb_logger, save_img)
        barrier()

    def saved_outputs(self):
        """Names of the outputs written as images (subclasses list theirs)."""
        return list(self.opt.get('val', {}).get('outputs') or self.default_saved_outputs)

    default_saved_outputs = ()

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        val_opt = self.opt.get('val') or {}
        dataset_name = dataloader.dataset.opt['name']
        metric_opts = OrderedDict(val_opt.get('metrics') or {})
        is_test = not self.opt['is_train']
        rows = []
        max_images = val_opt.get('max_images')
        pbar = tqdm(total=len(dataloader) if not max_images else min(max_images, len(dataloader)), unit='image',
                    desc=f'{dataset_name}', dynamic_ncols=True, disable=not val_opt.get('pbar', True))
        metric_opts = self._drop_unavailable_metrics(metric_opts)
        set_metrics = InceptionFeatureSets(metric_opts)  # FID, KID: one value over the whole set
        metric_opts = OrderedDict((k, v) for k, v in metric_opts.items() if k not in set_metrics.entries)
        warned = set()  # metrics already warned about
        self.begin_validation()
        for idx, val_data in enumerate(dataloader):
            if max_images and idx >= max_images:
                break
            img_name = osp.splitext(osp.basename(val_data.get('gt_path', val_data.get('lq_path'))[0]))[0]
            self.feed_data(val_data)
            self.test()
            visuals = self.get_current_visuals()
            images = {key: tensor2img(value.clone()) for key, value in visuals.items()}
            row = OrderedDict(image=img_name)
            for metric_name, opt_ in metric_opts.items():
                output_key, target_key = opt_['output'], opt_['target']
                if output_key not in images or target_key not in images:
                    if metric_name not in warned:  # e.g. a test set without the target images
                        warned.add(metric_name)
                        get_root_logger().warning(f'metric {metric_name} skipped for {dataset_name}: image {img_name} '
                                                  f'has no {output_key if output_key not in images else target_key}')
                    continue
                arguments = {k: v for k, v in opt_.items() if k not in METRIC_ROUTING_KEYS}  # with its type
                value = float(calculate_metric({'img': images[output_key], 'img2': images[target_key]}, arguments))
                if not math.isfinite(value) and metric_name not in warned:
                    warned.add(metric_name)  # e.g. SSIM of a 4x4 LR: no 11x11 window fits
                    height, width = images[output_key].shape[:2]
                    get_root_logger().warning(
                        f'metric {metric_name} is {value} for {dataset_name}/{img_name}: {output_key} is {width}x{height} '
                        f'pixels (crop border {arguments.get("crop_border", 0)}), maybe too small for the metric')
                row[metric_name] = value
            rows.append(row)
            set_metrics.add(images)
            if save_img:
                for key in self.saved_outputs():
                    if key not in images:
                        continue
                    if is_test:
                        save_path = osp.join(self.opt['path']['results_root'], dataset_name, key, f'{img_name}.png')
                    else:
                        save_path = osp.join(self.opt['path']['visualization'], dataset_name, key,
                                             f'{img_name}_{current_iter}.png')
                    write_image(save_path, visuals[key])  # atomic: an interrupted run leaves no partial file
            pbar.update(1)
            pbar.set_postfix_str(img_name)
        pbar.close()
        means = self._summarise_metrics(rows, OrderedDict(**set_metrics.compute(), **self.dataset_metrics()),
                                        dataset_name, current_iter, tb_logger)
        self.last_validation = {'dataset': dataset_name, 'rows': rows, 'mean': means}
        return means

    def begin_validation(self):
        """Called before the first image of a validation set (e.g. to reset set-level statistics)."""

    def dataset_metrics(self):
        """Set-level values measured over the whole validation set (name -> float), reported beside
        the means of the per-image metrics (CSV mean row, table, TensorBoard)."""
        return OrderedDict()

    @staticmethod
    def _drop_unavailable_metrics(metric_opts):
        """Metrics marked ``optional: true`` whose weights are not on this machine are skipped
        (with a warning naming the missing file); without ``optional`` the run stops at start."""
        kept = OrderedDict()
        for name, opt_ in metric_opts.items():
            try:
                check_metric_weights(opt_)
            except WeightsNotFoundError as err:
                if not opt_.get('optional', False):
                    raise
                get_root_logger().warning(f'metric {name} skipped: {err}')
                continue
            kept[name] = opt_
        return kept

    def _update_best_metrics(self, dataset_name, means, current_iter, logger):
        """Keep and log the best mean of every ``val:metrics`` entry (``better: higher`` by default,
        or ``lower``) and the iteration that reached it, as basicsr does."""
        metric_opts = (self.opt.get('val') or {}).get('metrics') or {}
        for name, metric_opt in metric_opts.items():
            value = means.get(name)
            if value is None or not math.isfinite(value):
                continue
            key = f'{dataset_name}/{name}'
            best = self.best_metrics.get(key)
            lower = metric_opt.get('better', 'higher') == 'lower'
            if best is None or (value < best['value'] if lower else value > best['value']):
                best = self.best_metrics[key] = {'value': value, 'iter': current_iter}
            logger.info(f'Best {key} ({"lower" if lower else "higher"} is better): {best["value"]:.4f} '
                        f'@ iter {best["iter"]}')

    def _summarise_metrics(self, rows, set_metrics, dataset_name, current_iter, tb_logger):
        image_columns = [c for c in (rows[0].keys() if rows else []) if c != 'image']
        means = OrderedDict((c, float(np.mean([r[c] for r in rows if c in r]))) for c in image_columns)
        means.update(set_metrics)
        columns = list(means)
        if not columns:
            return means
        if self.opt['is_train']:
            out_dir = self.opt['path']['visualization']
            csv_path = osp.join(out_dir, f'metrics_{dataset_name}_{current_iter}.csv')
        else:
            out_dir = self.opt['path']['results_root']
            csv_path = osp.join(out_dir, f'metrics_{dataset_name}.csv')
        os.makedirs(out_dir, exist_ok=True)
        image_rows = rows if image_columns else []  # set-level values alone: only the mean row
        table = io.StringIO(newline='')
        writer = csv.writer(table)
        writer.writerow(['image'] + columns)
        for r in image_rows:
            writer.writerow([r['image']] + [f'{r[c]:.4f}' if c in r else '' for c in columns])
        writer.writerow(['mean'] + [f'{means[c]:.4f}' if math.isfinite(means[c]) else str(means[c])
                                    for c in columns])
        atomic_write_bytes(csv_path, table.getvalue().encode('utf-8'))
        logger = get_root_logger()
        logger.info(format_metrics_table(image_rows, columns, means, title=f'{dataset_name} @ {current_iter}'))
        logger.info(f'metrics written to {csv_path}')
        if self.opt['is_train']:
            self._update_best_metrics(dataset_name, means, current_iter, logger)
        if tb_logger is not None:
            for c, v in means.items():
                if math.isfinite(v):
                    tb_logger.add_scalar(f'metrics/{dataset_name}/{c}', v, current_iter)
        return means


def format_metrics_table(rows, columns, means, title=''):
    """A plain-text table: one row per image, then the mean."""
    name_w = max([len('image'), len('mean')] + [len(r['image']) for r in rows])
    col_w = [max(len(c), 9) for c in columns]
    line = '-' * (name_w + sum(w + 3 for w in col_w))
    out = [title, line, 'image'.ljust(name_w) + ''.join(' | ' + c.rjust(w) for c, w in zip(columns, col_w)), line]
    for r in rows:
        out.append(r['image'].ljust(name_w)
                   + ''.join(' | ' + (f'{r[c]:.4f}' if c in r else '').rjust(w) for c, w in zip(columns, col_w)))
    out.append(line)
    out.append('mean'.ljust(name_w) + ''.join(' | ' + f'{means[c]:.4f}'.rjust(w) for c, w in zip(columns, col_w)))
    return '\n'.join(out)
