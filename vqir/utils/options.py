"""Command line and YAML options, the way BasicSR users know them, checked before anything runs.

Differences from ``basicsr.utils.options.parse_options`` (which we otherwise follow):
- the distributed backend follows the hardware (gloo on CPU, NCCL on CUDA);
- ``--force_yml a:b=value`` is parsed as YAML, never ``exec``-ed, and options files are read
  with YAML's safe loader (basicsr's loader builds arbitrary Python objects from tags such as
  ``!!python/object/apply``);
- unknown top-level keys and values of the wrong type are errors that name the file and key,
  instead of being ignored or failing deep inside a run;
- the ``type`` of the model, datasets, networks, losses and optimisers must be registered and
  their keyword arguments must fit the class, checked before a run creates any folder; so must
  the ``type`` and arguments of the validation metrics (``val:metrics``);
- as basicsr's parser, it knows no particular model: a model lists the ``train:`` / ``val:`` /
  top-level keys only it reads (``train_keys``, ``val_keys``, ``top_level_keys``) and checks their
  values in its ``check_options`` hook; losses and metrics name their weight files in a
  ``required_weights`` hook.
"""
import argparse
import difflib
import importlib.util
import inspect
import json
import random
import sys
import time
from collections import OrderedDict
from os import path as osp

import torch
import yaml
from basicsr.utils import set_random_seed
from basicsr.utils.options import dict2str  # noqa: F401  (re-exported)

from .atomic_file import atomic_write_bytes
from .dist import get_dist_info, init_dist, master_only
from .errors import InputError
from .hub_weights import WeightsNotFoundError
from .img_util import check_network_color
from ..version import __version__


class OptionsError(InputError, ValueError):
    """A problem with an options file; the message names the file and the key."""


# Top-level keys of an options file. ``network_*`` (any suffix) is allowed as well.
KNOWN_TOP_LEVEL_KEYS = {
    'name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'path', 'train', 'val',
    'logger', 'dist_params', 'find_unused_parameters', 'cudnn_benchmark', 'cpu_threads', 'network_color',
    'inference', 'ir_scale', 'stage',
}
KNOWN_PATH_KEYS_PREFIXES = ('pretrain_network_', 'strict_load_', 'param_key_')
KNOWN_PATH_KEYS = {'resume_state', 'root', 'ignore_resume_networks', 'results_root', 'experiments_root'}
# set from experiments_root (training) or results_root (testing), never read from the file
DERIVED_PATH_KEYS = ('models', 'training_states', 'log', 'visualization')
KNOWN_LOGGER_KEYS = {'print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb', 'pbar'}
KNOWN_WANDB_KEYS = ('project', 'entity', 'resume_id')
# val: keys every model reads; a model adds the ones only it reads in its ``val_keys``
KNOWN_VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'metrics', 'pbar', 'outputs', 'max_images', 'keep_best'}
# train: keys every model reads, besides optimisers (optim_*) and losses (*_opt); a model adds the
# ones only it reads in its ``train_keys`` and checks their values in its ``check_options`` hook
KNOWN_TRAIN_KEYS = {'total_iter', 'warmup_iter', 'scheduler', 'max_bad_steps', 'grad_clip_norm', 'mixed_precision'}
# train.mixed_precision -> autocast dtype (None: float32 throughout)
MIXED_PRECISION = OrderedDict([('fp32', None), ('bf16', torch.bfloat16), ('fp16', torch.float16)])


# Keys of a val:metrics entry, besides its type, that are not arguments of the metric function.
METRIC_ROUTING_KEYS = ('output', 'target', 'better', 'optional')


class OrderedSafeLoader(yaml.SafeLoader):
    """YAML's safe loader (plain data only: an options file is untrusted input), with mappings
    read as OrderedDicts, as basicsr's loader gives them."""


OrderedSafeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    lambda loader, node: OrderedDict(loader.construct_pairs(node)))


def load_options_file(opt_path):
    """Read an options YAML into an OrderedDict; one clear error for every way it can be wrong."""
    if not osp.isfile(opt_path):
        raise OptionsError(f'{opt_path}: options file not found')
    try:
        with open(opt_path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=OrderedSafeLoader)  # noqa: S506  (a safe loader)
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
        raise OptionsError(f'{opt_path}: not valid YAML{where}: {getattr(err, "problem", err)}') from None
    except UnicodeDecodeError:
        raise OptionsError(f'{opt_path}: not a text file') from None
    if not isinstance(opt, dict):
        raise OptionsError(f'{opt_path}: expected a mapping of options at the top level, got {type(opt).__name__}')
    return opt


def did_you_mean(name, choices):
    """' (did you mean "x"?)' for the closest of ``choices``, or '' when none is close."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ''


def _expect(cond, opt_path, key, what):
    if not cond:
        raise OptionsError(f'{opt_path}: option {key} {what}')


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_options(opt, opt_path, is_train):
    """Reject unknown keys and wrong types early, naming the file and the key."""
    network_keys = [key for key in opt if key.startswith('network_') and key not in KNOWN_TOP_LEVEL_KEYS]
    for key in opt:
        if key not in KNOWN_TOP_LEVEL_KEYS and key not in network_keys:
            raise OptionsError(f'{opt_path}: unknown option key "{key}" '
                               f'(known: {", ".join(sorted(KNOWN_TOP_LEVEL_KEYS))}, network_*)')
    for key in ('name', 'model_type'):
        _expect(isinstance(opt.get(key), str) and opt.get(key), opt_path, key, 'is required and must be a string')
    num_gpu = opt.setdefault('num_gpu', 'auto')
    _expect(num_gpu == 'auto' or (isinstance(num_gpu, int) and num_gpu >= 0), opt_path, 'num_gpu',
            f'must be "auto" or a non-negative integer, got {num_gpu!r}')
    seed = opt.get('manual_seed')
    _expect(seed is None or isinstance(seed, int), opt_path, 'manual_seed', f'must be an integer, got {seed!r}')
    threads = opt.get('cpu_threads')
    _expect(threads is None or (_is_int(threads) and threads >= 1), opt_path, 'cpu_threads',
            f'must be a positive integer (or ~ for one per core), got {threads!r}')
    datasets = opt.get('datasets')
    _expect(isinstance(datasets, dict) and datasets, opt_path, 'datasets', 'is required and must be a mapping')
    for phase, dataset in datasets.items():
        _expect(isinstance(dataset, dict), opt_path, f'datasets:{phase}', 'must be a mapping')
        _expect(isinstance(dataset.get('type'), str), opt_path, f'datasets:{phase}:type', 'is required')
        if is_train:
            _expect(phase == 'train' or phase.startswith('val'), opt_path, f'datasets:{phase}',
                    'is not a valid phase in a training file (use train, val, val_1, ...)')
    for key in network_keys:
        value = opt[key]
        _expect(isinstance(value, dict) and isinstance(value.get('type'), str), opt_path, key,
                'must be a mapping with a "type"')
    path = opt.setdefault('path', OrderedDict())
    _expect(isinstance(path, dict), opt_path, 'path', 'must be a mapping')
    for key in path:
        _expect(key not in DERIVED_PATH_KEYS, opt_path, f'path:{key}',
                'is set from path:experiments_root (training) or path:results_root (testing); set that instead')
        _expect(key in KNOWN_PATH_KEYS or key.startswith(KNOWN_PATH_KEYS_PREFIXES), opt_path, f'path:{key}',
                'is not a known path key')
    wrong_root = 'results_root' if is_train else 'experiments_root'
    _expect(wrong_root not in path, opt_path, f'path:{wrong_root}',
            f'is read only by {"test.py" if is_train else "train.py"}; this {"training" if is_train else "test"} '
            'run would ignore it')
    for key in ('experiments_root', 'results_root', 'root'):
        _expect(path.get(key) is None or isinstance(path[key], str), opt_path, f'path:{key}',
                f'must be a folder name, got {path.get(key)!r}')
    for section in ('logger', 'val'):
        _expect(opt.get(section) is None or isinstance(opt[section], dict), opt_path, section, 'must be a mapping')
    for key in opt.get('logger') or {}:
        _expect(key in KNOWN_LOGGER_KEYS, opt_path, f'logger:{key}',
                f'is not a known logger key ({", ".join(sorted(KNOWN_LOGGER_KEYS))})')
    network_color = opt.get('network_color', 'rgb')
    try:
        check_network_color(network_color)
    except ValueError as err:
        raise OptionsError(f'{opt_path}: option {err}') from None
    _check_wandb((opt.get('logger') or {}).get('wandb'), (opt.get('logger') or {}).get('use_tb_logger'), opt_path)
    if is_train:
        train = opt.get('train')
        _expect(isinstance(train, dict), opt_path, 'train', 'is required for training')
        _expect(isinstance(train.get('total_iter'), int) and train['total_iter'] > 0, opt_path, 'train:total_iter',
                'must be a positive integer')
        _expect('train' in datasets, opt_path, 'datasets:train', 'is required for training')
        train_set = datasets['train']
        for key, least in (('batch_size_per_gpu', 1), ('num_worker_per_gpu', 0), ('dataset_enlarge_ratio', 1)):
            if key in train_set or key == 'batch_size_per_gpu':
                value = train_set.get(key)
                _expect(_is_int(value) and value >= least, opt_path,
                        f'datasets:train:{key}', f'must be an integer >= {least}, got {value!r}')
        precision = train.get('mixed_precision')
        _expect(precision is None or precision in MIXED_PRECISION, opt_path, 'train:mixed_precision',
                f'must be one of {", ".join(MIXED_PRECISION)} (or absent), got {precision!r}')
        bad_steps = train.get('max_bad_steps', 1)
        _expect(_is_int(bad_steps) and bad_steps > 0, opt_path,
                'train:max_bad_steps', f'must be a positive integer, got {bad_steps!r}')
        clip = train.get('grad_clip_norm')
        _expect(clip is None or (_is_number(clip) and clip > 0), opt_path, 'train:grad_clip_norm',
                f'must be a positive number (or absent), got {clip!r}')
        for key, value in train.items():
            if key.startswith('optim_') and isinstance(value, dict):
                lr = value.get('lr')
                _expect(_is_number(lr), opt_path, f'train:{key}:lr',
                        f'must be a number, got {lr!r} (YAML reads 1e-4 as a string: write !!float 1e-4)')
        logger = opt.setdefault('logger', OrderedDict())
        logger.setdefault('use_tb_logger', False)
        for key in ('print_freq', 'save_checkpoint_freq'):
            logger.setdefault(key, 100 if key == 'print_freq' else 5000)
            if isinstance(logger[key], float) and logger[key].is_integer():  # basicsr files write !!float 5e3
                logger[key] = int(logger[key])
            _expect(isinstance(logger[key], int) and logger[key] > 0, opt_path, f'logger:{key}', 'must be a positive integer')
    if is_train and opt.get('val') is not None:
        _expect('val_freq' in opt['val'], opt_path, 'val:val_freq', 'is required when a training file has a val section')
    if opt.get('val') is not None and 'val_freq' in opt['val']:
        _expect(_is_number(opt['val']['val_freq']) and opt['val']['val_freq'] > 0, opt_path, 'val:val_freq',
                'must be a positive number')
    if (opt.get('val') or {}).get('keep_best') is not None:
        _check_keep_best(opt, opt_path, is_train)


def _check_keep_best(opt, opt_path, is_train):
    """``val:keep_best: {dataset: <a val set's name>, metric: <a val:metrics entry>}`` (training only)."""
    keep_best = opt['val']['keep_best']
    _expect(is_train, opt_path, 'val:keep_best', 'is read only by train.py; a test run would ignore it')
    _expect(isinstance(keep_best, dict) and set(keep_best) == {'dataset', 'metric'}, opt_path, 'val:keep_best',
            f'must be a mapping with the keys dataset and metric, got {keep_best!r}')
    val_sets = [d.get('name') for phase, d in opt['datasets'].items() if phase.startswith('val')]
    _expect(keep_best['dataset'] in val_sets, opt_path, 'val:keep_best:dataset',
            f'must be the name of a validation set ({", ".join(map(str, val_sets)) or "none in datasets"}), '
            f'got {keep_best["dataset"]!r}')
    metrics = opt['val'].get('metrics') or {}
    _expect(keep_best['metric'] in metrics, opt_path, 'val:keep_best:metric',
            f'must be an entry of val:metrics ({", ".join(metrics) or "none"}), got {keep_best["metric"]!r}')


def _registered(registry, kind, name, opt_path, key):
    """The class registered as ``name`` (basicsr's own classes also answer to ``<name>_basicsr``)."""
    for candidate in (name, f'{name}_basicsr'):
        if candidate in registry:
            return registry.get(candidate)
    hint = did_you_mean(name, [n for n, _ in registry])
    raise OptionsError(f'{opt_path}: option {key}: no {kind} named "{name}"{hint}')


def _check_arguments(cls, block, opt_path, key, *args, **given):
    """The options of ``block`` (less ``type``) must be keyword arguments that ``cls`` accepts, beside
    the positional ``args`` and keyword ``given`` arguments the caller passes itself."""
    kwargs = {k: v for k, v in block.items() if k != 'type'}
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature to check against
        return
    params = signature.parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            described = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                described.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ''))
            raise OptionsError(f'{opt_path}: option {key}: {cls.__name__} got an unexpected keyword argument '
                               f'{", ".join(described)}')
    try:
        signature.bind(*args, **given, **kwargs)
    except TypeError as err:
        raise OptionsError(f'{opt_path}: option {key}: {cls.__name__} {err}') from None


def check_components(opt, opt_path, is_train=True):
    """Types and keyword arguments of the model, datasets, networks, losses (``train:*_opt``) and
    optimisers (``train:optim_*``), against the registries and the classes' signatures.

    A typo (``type: VQGANN``, ``ch_mul:``, ``betaz:``) is thus one OptionsError naming the file and
    the key, raised before the run creates anything, instead of a traceback from inside the model.
    """
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY
    model = _registered(MODEL_REGISTRY, 'model', opt['model_type'], opt_path, 'model_type')
    for phase, dataset in opt['datasets'].items():
        _registered(DATASET_REGISTRY, 'dataset', dataset['type'], opt_path, f'datasets:{phase}:type')
    for key, block in opt.items():
        if key.startswith('network_') and isinstance(block, dict):
            network = _registered(ARCH_REGISTRY, 'network', block['type'], opt_path, f'{key}:type')
            _check_arguments(network, block, opt_path, key)
    for key, block in (opt.get('train') or {}).items():
        if not (isinstance(block, dict) and isinstance(block.get('type'), str)):
            continue
        if key.startswith('optim_'):
            optimizer = getattr(torch.optim, block['type'], None)
            _expect(isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer), opt_path,
                    f'train:{key}:type', f'"{block["type"]}" is not a torch.optim optimizer (e.g. Adam, AdamW, SGD)')
            _check_arguments(optimizer, block, opt_path, f'train:{key}', [])
        elif key.endswith('_opt'):
            loss = _registered(LOSS_REGISTRY, 'loss', block['type'], opt_path, f'train:{key}:type')
            _check_arguments(loss, block, opt_path, f'train:{key}')
    _check_model_keys(opt, opt_path, model, MODEL_REGISTRY, is_train)
    if hasattr(model, 'check_options'):  # the values of what only this model reads, checked where the model is
        model.check_options(opt, opt_path)
    image_names = model.image_names(opt) if hasattr(model, 'image_names') else None
    _check_metrics(opt.get('val') or {}, opt_path, opt['model_type'], image_names)


def _check_model_keys(opt, opt_path, model, registry, is_train):
    """Keys of ``train`` and ``val``: the generic ones, and those the model lists in its ``train_keys``
    / ``val_keys``; top-level keys that some models list in their ``top_level_keys``: only those of
    this model. A key that another model reads would be ignored silently: say whose it is."""
    def owners(key, attribute):
        return sorted(name for name, cls in registry if key in getattr(cls, attribute, ()))

    for key in opt:
        _expect(key in getattr(model, 'top_level_keys', ()) or not owners(key, 'top_level_keys'), opt_path, key,
                f'is read only by {" and ".join(owners(key, "top_level_keys"))}; {opt["model_type"]} would ignore it')
    sections = [('val', KNOWN_VAL_KEYS, 'val_keys', '')]
    if is_train:
        sections.insert(0, ('train', KNOWN_TRAIN_KEYS, 'train_keys', ', optim_* (optimisers) and *_opt (losses)'))
    for section, generic, attribute, also in sections:
        known = set(generic) | set(getattr(model, attribute, ()))
        for key in opt.get(section) or {}:
            if key in known or (section == 'train' and (key.startswith('optim_') or key.endswith('_opt'))):
                continue
            _expect(not owners(key, attribute), opt_path, f'{section}:{key}',
                    f'is read only by {" and ".join(owners(key, attribute))}; {opt["model_type"]} would ignore it')
            _expect(False, opt_path, f'{section}:{key}', f'is not a known {section} key'
                    f'{did_you_mean(key, sorted(known))}: known are {", ".join(sorted(known))}{also}')


def _check_wandb(wandb_opt, use_tb_logger, opt_path):
    """``logger:wandb``: {project, entity, resume_id}; with a project, TensorBoard logging (what W&B
    receives) and the wandb package are needed (see :mod:`vqir.utils.wandb_run`)."""
    if wandb_opt is None:
        return
    _expect(isinstance(wandb_opt, dict), opt_path, 'logger:wandb', 'must be a mapping (project, entity, resume_id)')
    for key in wandb_opt:
        _expect(key in KNOWN_WANDB_KEYS, opt_path, f'logger:wandb:{key}',
                f'is not a known key ({", ".join(KNOWN_WANDB_KEYS)})')
    if wandb_opt.get('project'):
        _expect(bool(use_tb_logger), opt_path, 'logger:wandb:project',
                'needs logger:use_tb_logger: true (W&B logs what TensorBoard logs)')
        _expect(importlib.util.find_spec('wandb') is not None, opt_path, 'logger:wandb:project',
                'the wandb package is not installed (pip install wandb)')


def _check_metrics(val, opt_path, model_type, image_names):
    """``val:metrics``: each a registered metric with arguments it accepts and an ``output`` and a
    ``target`` among the model's ``image_names`` (when known); ``val:outputs`` a list of those names.
    A misspelt name would otherwise measure or save nothing, silently."""
    from basicsr.utils.registry import METRIC_REGISTRY
    metrics = val.get('metrics')
    _expect(metrics is None or isinstance(metrics, dict), opt_path, 'val:metrics',
            'must be a mapping of metric names to their options')
    for name, block in (metrics or {}).items():
        key = f'val:metrics:{name}'
        _expect(isinstance(block, dict) and isinstance(block.get('type'), str), opt_path, key,
                'must be a mapping with a "type" (e.g. calculate_psnr)')
        metric = _registered(METRIC_REGISTRY, 'metric', block['type'], opt_path, f'{key}:type')
        for role in ('output', 'target'):
            _expect(isinstance(block.get(role), str), opt_path, f'{key}:{role}',
                    f'is required: the name of the {role} image'
                    + (f' ({", ".join(image_names)})' if image_names else ''))
            _check_image_name(block[role], image_names, opt_path, f'{key}:{role}', model_type)
        _expect(block.get('better', 'higher') in ('higher', 'lower'), opt_path, f'{key}:better',
                f"must be 'higher' (default) or 'lower', got {block.get('better')!r}")
        arguments = {k: v for k, v in block.items() if k not in METRIC_ROUTING_KEYS}
        _check_arguments(metric, arguments, opt_path, key, img=None, img2=None)  # as calculate_metric calls it
    outputs = val.get('outputs')
    _expect(outputs is None or (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)),
            opt_path, 'val:outputs', f'must be a list of image names, got {outputs!r}')
    for name in outputs or ():
        _check_image_name(name, image_names, opt_path, 'val:outputs', model_type)


def _check_image_name(name, image_names, opt_path, key, model_type):
    if image_names is None or name in image_names:
        return
    raise OptionsError(f'{opt_path}: option {key}: {model_type} has no image named "{name}"'
                       f'{did_you_mean(name, image_names)}; '
                       f'it has {", ".join(image_names)}')


def check_weight_files(opt, opt_path):
    """The weight files a run reads exist, checked before it creates any folder: every
    ``path:pretrain_network_*``, and what each ``train:*_opt`` loss and each ``val:metrics`` entry
    not marked ``optional`` reads (an optional metric is skipped at validation instead): a loss or
    metric names its files in a ``required_weights`` hook (LPIPS, DISTS, FID / KID)."""
    from basicsr.utils.registry import LOSS_REGISTRY, METRIC_REGISTRY
    for key, value in opt['path'].items():
        if key.startswith('pretrain_network_') and isinstance(value, str) and not osp.isfile(value):
            raise OptionsError(f'{opt_path}: option path:{key}: {value}: no such file')
    checks = [(LOSS_REGISTRY, block, ('type', ), f'train:{key}') for key, block in (opt.get('train') or {}).items()
              if key.endswith('_opt') and isinstance(block, dict)]
    checks += [(METRIC_REGISTRY, block, _METRIC_NON_ARGUMENTS, f'val:metrics:{name}')
               for name, block in ((opt.get('val') or {}).get('metrics') or {}).items() if not block.get('optional')]
    for registry, block, skipped_keys, key in checks:
        try:
            _required_weights(registry, block, skipped_keys)
        except WeightsNotFoundError as err:
            raise type(err)(f'{opt_path}: option {key}: {err}') from None


def check_metric_weights(block):
    """Raise :class:`WeightsNotFoundError` when a weight file that the ``val:metrics`` entry
    ``block`` reads is missing (the metric's ``required_weights`` hook names them)."""
    from basicsr.utils.registry import METRIC_REGISTRY
    _required_weights(METRIC_REGISTRY, block, _METRIC_NON_ARGUMENTS)


_METRIC_NON_ARGUMENTS = METRIC_ROUTING_KEYS + ('type', )


def _required_weights(registry, block, skipped_keys):
    """Call the ``required_weights`` hook of the loss or metric ``block`` names, with its arguments."""
    try:
        component = registry.get(block.get('type'))
    except KeyError:  # an unknown type was reported by check_components
        return
    required = getattr(component, 'required_weights', None)
    if required is not None:
        required(**{k: v for k, v in block.items() if k not in skipped_keys})


def apply_force_yml(opt, entries, opt_path='--force_yml'):
    """Apply ``a:b:c=value`` overrides; values are parsed as YAML (``1e-4`` stays a number)."""
    for entry in entries or []:
        if '=' not in entry:
            raise OptionsError(f'{opt_path}: "{entry}" is not of the form key:sub=value')
        keys, value = entry.split('=', 1)
        keys = [k.strip() for k in keys.split(':')]
        try:
            value = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            value = value.strip()
        if isinstance(value, str):  # 1e-4 without a dot is a string to PyYAML
            try:
                value = float(value) if value.lower() not in ('nan', 'inf', '-inf') else value
            except ValueError:
                pass
        node = opt
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                raise OptionsError(f'{opt_path}: cannot set {":".join(keys)}: {":".join(keys[:depth + 1])} is not a mapping')
            node = node[key]
        node[keys[-1]] = value


def build_arg_parser(is_train):
    parser = argparse.ArgumentParser(description=('Train' if is_train else 'Test') + ' a vqir model from an options YAML.')
    parser.add_argument('-opt', type=str, required=True, help='Path to the option YAML file.')
    parser.add_argument('--version', action='version', version=f'%(prog)s (vqir {__version__})')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none', help='job launcher')
    # accepted by test.py as well, as basicsr's parser does, but only training uses them
    parser.add_argument('--auto_resume', action='store_true',
                        help='resume from the newest training state' if is_train else argparse.SUPPRESS)
    parser.add_argument('--debug', action='store_true',
                        help='debug mode: name gets a debug_ prefix, frequent logs' if is_train else argparse.SUPPRESS)
    parser.add_argument('--local_rank', type=int, default=0)
    example = ('train:total_iter=100 datasets:train:batch_size_per_gpu=2' if is_train else
               'path:pretrain_network_g=net_g.pth datasets:test_1:dataroot_gt=photos')
    parser.add_argument('--force_yml', nargs='+', default=None, help=f'override options, e.g. {example}')
    if not is_train:
        parser.add_argument('--tile', type=int, default=None, help='tile size in HR pixels (0 = never tile)')
        parser.add_argument('--tile_overlap', '--tile-overlap', type=int, default=None,
                            help='overlap between tiles in HR pixels')
    return parser


def apply_process_options(opt):
    """Process-wide settings of a run: cuDNN autotuning (``cudnn_benchmark``, default on) and the
    number of CPU threads torch uses (``cpu_threads``; default: torch's, one per core)."""
    torch.backends.cudnn.benchmark = bool(opt.get('cudnn_benchmark', True))
    if opt.get('cpu_threads'):
        torch.set_num_threads(opt['cpu_threads'])


def parse_options(root_path, is_train=True, argv=None):
    """Parse the command line and the options file; set up distributed training and seeds.

    Returns (opt, args). Experiments go to ``<root>/experiments/<name>``, test results to
    ``<root>/results/<name>``, where root is ``path:root`` from the file or ``root_path``.
    """
    args = build_arg_parser(is_train).parse_args(argv)
    opt = load_options_file(args.opt)
    apply_force_yml(opt, args.force_yml, args.opt)
    if not is_train and isinstance(opt.get('datasets'), dict):
        # `--force_yml datasets:test_2=~` leaves a test set out (e.g. one not downloaded)
        opt['datasets'] = OrderedDict((k, v) for k, v in opt['datasets'].items() if v is not None)
    if not is_train and args.tile is not None:
        opt.setdefault('inference', OrderedDict())['tile'] = args.tile
    if not is_train and args.tile_overlap is not None:
        opt.setdefault('inference', OrderedDict())['tile_overlap'] = args.tile_overlap
    check_options(opt, args.opt, is_train)
    check_components(opt, args.opt, is_train)
    root_path = osp.abspath(osp.expanduser(opt['path'].get('root') or root_path))
    opt['root_path'] = root_path
    opt['opt_path'] = osp.abspath(args.opt)

    if args.launcher == 'none':
        opt['dist'] = False
    else:
        opt['dist'] = True
        init_dist(args.launcher, **(opt.get('dist_params') or {}))
    opt['rank'], opt['world_size'] = get_dist_info()

    seed = opt.get('manual_seed')
    if seed is None:
        seed = random.randint(1, 10000)
        opt['manual_seed'] = seed
    set_random_seed(seed + opt['rank'])

    opt['auto_resume'] = args.auto_resume
    opt['is_train'] = is_train
    if args.debug and not opt['name'].startswith('debug'):
        opt['name'] = 'debug_' + opt['name']
    if opt['num_gpu'] == 'auto':
        opt['num_gpu'] = torch.cuda.device_count()
    elif opt['num_gpu'] > 0 and not torch.cuda.is_available():
        raise OptionsError(f'{args.opt}: num_gpu is {opt["num_gpu"]} but no CUDA device is available '
                           '(use num_gpu: auto or 0 to run on the CPU)')

    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase.split('_')[0]
        if 'scale' in opt:
            dataset['scale'] = opt['scale']
        for key in ('dataroot_gt', 'dataroot_lq', 'dataroot_LR', 'meta_info_file'):
            if isinstance(dataset.get(key), str):
                dataset[key] = resolve_path(dataset[key], root_path)

    for key, val in opt['path'].items():
        if isinstance(val, str) and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = resolve_path(val, root_path)

    if is_train:
        experiments_root = _output_root(opt['path'].get('experiments_root'), root_path, 'experiments', opt['name'])
        opt['path'].update(experiments_root=experiments_root,
                           models=osp.join(experiments_root, 'models'),
                           training_states=osp.join(experiments_root, 'training_states'),
                           log=experiments_root,
                           visualization=osp.join(experiments_root, 'visualization'))
        if 'debug' in opt['name']:
            if opt.get('val') is not None:
                opt['val']['val_freq'] = 8
            opt['logger']['print_freq'] = 1
            opt['logger']['save_checkpoint_freq'] = 8
    else:
        results_root = _output_root(opt['path'].get('results_root'), root_path, 'results', opt['name'])
        opt['path'].update(results_root=results_root, log=results_root,
                           visualization=osp.join(results_root, 'visualization'))
    return opt, args


def _output_root(configured, root_path, default_folder, name):
    """Where a run writes: ``path:experiments_root`` / ``path:results_root`` when the file sets it
    (relative to the root, as BasicSR's), else ``<root>/<experiments|results>/<name>``."""
    if configured:
        return osp.join(root_path, osp.expanduser(configured))  # an absolute path stays as it is
    return osp.join(root_path, default_folder, name)


def resolve_path(path, root_path):
    """A relative data or weights path of an options file: under ``root_path`` (the project root,
    where experiments/ live) where it exists there, else in the current directory where it exists
    there, else under the root; so the shipped options work from any directory."""
    path = osp.expanduser(path)
    if osp.isabs(path):
        return path
    under_root = osp.join(root_path, path)
    if not osp.exists(under_root) and osp.exists(path):
        return osp.abspath(path)
    return under_root


def _run_header():
    return f'# GENERATE TIME: {time.asctime()}\n# CMD:\n# {" ".join(sys.argv)}\n\n'


@master_only
def copy_opt_file(opt_file, experiments_root):
    """Copy the options file into the experiment folder, headed by the command that ran it (atomically)."""
    with open(opt_file, encoding='utf-8') as f:
        content = f.read()
    atomic_write_bytes(osp.join(experiments_root, osp.basename(opt_file)), (_run_header() + content).encode('utf-8'))


@master_only
def save_resolved_options(opt, folder, file_name='options.yml'):
    """The options a run used (after ``--force_yml`` and every default) as YAML in ``folder``, headed
    by the command: what ``scripts/metrics/metrics_table.py`` reads a test run's scale and metrics from."""
    plain = json.loads(json.dumps(opt, default=str))  # OrderedDicts and paths as plain YAML
    text = _run_header() + yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
    atomic_write_bytes(osp.join(folder, file_name), text.encode('utf-8'))
