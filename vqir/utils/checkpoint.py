"""The one place where checkpoints are read and written.

A checkpoint is untrusted input. Reading never executes code from the file:

* ``.safetensors`` files are read with ``safetensors.torch.load_file``;
* ``torch.save`` files are read with ``torch.load(..., map_location='cpu', weights_only=True)``.
  PyTorch-Lightning / taming ``.ckpt`` files also hold objects that ``weights_only`` refuses
  (callback classes used as dict keys, hyper-parameter objects, numpy scalars). For those, every
  global the file names that torch does not allow is replaced by an inert placeholder class (it
  is never imported) and the file is read again, still with ``weights_only=True``. A placeholder
  may be created empty and given state (how ordinary objects are pickled), but calling one (how
  a pickle runs a function, e.g. ``os.system``) aborts the load with ``CheckpointError``, except
  for a short list of known rebuild helpers (numpy scalars, paths, dates) that then also give
  placeholders; torch itself blocks the ``os``/``sys`` modules. Objects rebuilt by a call to their
  class (enums, for instance) and dict subclasses filled item by item are refused too. Only the
  tensors of the selected state_dict are kept.

Accepted layouts: a plain state_dict, basicsr's ``{'params': ..., 'params_ema': ...}``,
Lightning/taming's ``{'state_dict': ..., 'optimizer_states': ..., ...}``, and safetensors.

Writing is atomic: a temporary file in the target's directory is written, flushed, fsynced and
renamed over the target, so a crash never leaves a partial checkpoint behind.

A training state also holds the random states (``get_rng_state`` / ``set_rng_state``: torch, numpy,
Python, CUDA), as tensors and plain numbers that ``weights_only`` loads, so that a resumed run
continues the same curve.
"""
import os
import pickle
import random
import re
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from basicsr.utils import get_root_logger
from torch import nn

from .atomic_file import atomic_write
from .errors import InputError

__all__ = [
    'CheckpointError', 'LoadReport', 'load_checkpoint', 'load_state_dict', 'load_weights', 'save_state_dict',
    'atomic_torch_save', 'get_rng_state', 'set_rng_state'
]

_MAX_LISTED = 10
_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')
_PICKLE_PROTO = 0x80
# Globals that ordinary (non-malicious) objects use to rebuild themselves by a call. They are
# mapped to placeholders like every other unknown global (never imported, never run); being
# listed here only means that a call to them is accepted instead of refused.
_HARMLESS_RECONSTRUCTORS = frozenset({
    'copyreg._reconstructor',
    'numpy.core.multiarray.scalar',
    'numpy._core.multiarray.scalar',
    'numpy.core.multiarray._reconstruct',
    'numpy._core.multiarray._reconstruct',
    'numpy.dtype',
    'pathlib.Path',
    'pathlib.PosixPath',
    'pathlib.WindowsPath',
    'pathlib.PurePosixPath',
    'pathlib.PureWindowsPath',
    'datetime.datetime',
    'datetime.date',
    'datetime.time',
    'datetime.timedelta',
    'datetime.timezone',
})


class CheckpointError(InputError, ValueError, RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the network."""


@dataclass
class LoadReport:
    """What ``load_weights`` did. Keys are network keys (after ``key_map``)."""
    missing: list = field(default_factory=list)  # in the network, not in the file
    unexpected: list = field(default_factory=list)  # in the file, under a part the network has
    mismatched: list = field(default_factory=list)  # (key, shape in file, shape in network)
    dropped: list = field(default_factory=list)  # in the file, not used by the network (loss.*, other parts)
    loaded: int = 0


# ----------------------------------------------------------------------------------------------
# reading


class _RefusedCall(Exception):
    """Raised inside unpickling when the file asks to call a function."""

    def __init__(self, name):
        super().__init__(name)
        self.name = name


class _PlaceholderMeta(type):

    def __call__(cls, *args, **kwargs):
        # a pickle calls a global only through REDUCE/INST/OBJ: that is how it would run code
        if not cls._harmless_call:
            raise _RefusedCall(cls._global_name)
        obj = cls.__new__(cls)
        obj._call_args = args
        return obj


class _Placeholder(metaclass=_PlaceholderMeta):
    """Inert stand-in for an object of a class that is not imported. Stores whatever state it gets."""
    _global_name = '?'
    _harmless_call = False

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__['_new_args'] = args
        return obj

    def __setstate__(self, state):
        self.__dict__['_state'] = state

    def __repr__(self):
        return f'<placeholder for {self._global_name}>'


def _make_placeholder(global_name):
    return _PlaceholderMeta(
        'Placeholder', (_Placeholder, ), {
            '_global_name': global_name,
            '_harmless_call': global_name in _HARMLESS_RECONSTRUCTORS,
            '__module__': __name__
        })


def _sniff_format(path):
    """'zip' (torch.save), 'legacy' (old torch.save pickle), 'safetensors' or None, from the first bytes."""
    with open(path, 'rb') as f:
        head = f.read(9)
    size = os.path.getsize(path)
    if head[:4] in _ZIP_MAGIC:
        return 'zip'
    if len(head) == 9:
        header_len = int.from_bytes(head[:8], 'little')
        if head[8:9] == b'{' and 2 <= header_len <= size - 8:
            return 'safetensors'
    if head[0] == _PICKLE_PROTO:
        return 'legacy'
    return None


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _unpickling_reason(err):
    """The specific reason inside torch's long weights_only message (which advises weights_only=False)."""
    text = str(err)
    if 'WeightsUnpickler error:' in text:
        reason = text.split('WeightsUnpickler error:', 1)[1].strip()
        if reason:
            return reason.splitlines()[0]
    return _first_line(err)


def _unsupported_global(err):
    """Name of the global that torch's weights_only unpickler refused, or None."""
    match = re.search(r'Unsupported global: GLOBAL (\S+) was not an allowed global', str(err))
    if match is None:
        return None
    name = match.group(1)
    return name if '.' in name else f'builtins.{name}'  # torch strips 'builtins.' in this message


def _torch_load_weights_only(path, placeholder_names=()):
    """torch.load(weights_only=True) with the named globals mapped to placeholders.

    Returns the object, or raises pickle.UnpicklingError (torch refused something) or CheckpointError.
    """
    placeholders = [(_make_placeholder(name), name) for name in sorted(placeholder_names)]
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise
    except _RefusedCall as err:
        raise CheckpointError(f'{path}: refused: unpickling it would call {err.name}(...); only tensors and '
                              'plain data are read from checkpoints') from None
    except Exception as err:  # noqa: BLE001  (torch raises RuntimeError, EOFError, ... for damaged files)
        raise CheckpointError(f'{path}: truncated or corrupt checkpoint ({_first_line(err)})') from None


def _load_torch_file(path, file_format):
    """torch.load with weights_only=True; unknown globals become placeholders (see the module docstring).

    Returns (object, names of the globals read as placeholders).
    """
    try:
        return _torch_load_weights_only(path), []
    except pickle.UnpicklingError as err:
        error = err

    names = set()
    if file_format == 'zip':
        try:
            names.update(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as err:  # noqa: BLE001  (the load below reports the real problem)
            get_root_logger().debug(f'{path}: could not list globals: {err}')
    while True:
        # torch blocks these modules whatever the allow-list says
        blocked = sorted(n for n in names if n.split('.')[0] in ('os', 'sys', 'posix', 'nt'))
        if blocked or 'is blocked' in str(error):
            what = ', '.join(blocked) if blocked else _unpickling_reason(error)
            raise CheckpointError(f'{path}: refused: the file references {what}, which could run code when '
                                  'unpickled; only tensors and plain data are read from checkpoints')
        try:
            return _torch_load_weights_only(path, names), sorted(names)
        except pickle.UnpicklingError as err:
            name = _unsupported_global(err)
            if name is None or name in names:
                raise CheckpointError(f'{path}: cannot be read safely: {_unpickling_reason(err)}') from None
            names.add(name)  # a global the static scan missed (or a non-zip file): retry with it
            error = err


def _load_safetensors(path):
    from safetensors.torch import load_file
    try:
        return load_file(path, device='cpu')
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
        raise CheckpointError(f'{path}: not a valid safetensors file ({_first_line(err)})') from None


def load_checkpoint(path):
    """Read a whole checkpoint object safely (e.g. a training state), tensors on CPU.

    Objects of classes torch does not allow come back as inert placeholders. Raises
    CheckpointError for a missing, empty, truncated, unsafe or unrecognised file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f'{path}: no such file')
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: not a file')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'{path}: empty file')
    file_format = _sniff_format(path)
    if file_format == 'safetensors':
        return _load_safetensors(path)
    if file_format is None:
        if path.endswith('.safetensors'):
            raise CheckpointError(f'{path}: not a valid safetensors file (bad header)')
        raise CheckpointError(f'{path}: not a checkpoint (neither a torch.save file nor safetensors)')
    obj, placeholders = _load_torch_file(path, file_format)
    if placeholders:
        shown = ', '.join(placeholders[:_MAX_LISTED]) + (', ...' if len(placeholders) > _MAX_LISTED else '')
        get_root_logger().info(f'{path}: {len(placeholders)} non-tensor classes read as inert placeholders: '
                                f'{shown}')
    return obj


def _select_state_dict(obj, param_key, path):
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{path}: not a state_dict (the file holds a {type(obj).__name__})')
    if param_key == 'auto':
        for key in ('params_ema', 'params', 'state_dict'):
            if isinstance(obj.get(key), Mapping):
                return obj[key], key
        return obj, None
    if param_key is None:
        return obj, None
    if param_key not in obj:
        available = ', '.join(repr(k) for k in list(obj)[:_MAX_LISTED])
        raise CheckpointError(f'{path}: no key {param_key!r}; available keys: {available}')
    if not isinstance(obj[param_key], Mapping):
        raise CheckpointError(f'{path}: {param_key!r} holds a {type(obj[param_key]).__name__}, not a state_dict')
    return obj[param_key], param_key


def load_state_dict(path, param_key='auto'):
    """Read the parameters of one network from a checkpoint, as an OrderedDict of CPU tensors.

    Args:
        path: ``.pth``/``.ckpt`` (torch.save) or ``.safetensors`` file.
        param_key: 'auto' takes ``params_ema``, else ``params`` (basicsr), else ``state_dict``
            (Lightning/taming), else the file's top-level mapping; an explicit key must exist;
            None takes the top-level mapping.

    A leading ``module.`` (DDP) is removed from every key.
    """
    path = os.fspath(path)
    obj = load_checkpoint(path)
    state_dict, key = _select_state_dict(obj, param_key, path)
    where = f' (key {key!r})' if key else ''
    cleaned = OrderedDict()
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f'{path}: entry {name!r} of the state_dict{where} is a {type(value).__name__}, '
                                  'not a tensor')
        cleaned[name[len('module.'):] if name.startswith('module.') else name] = value
    if not cleaned:
        raise CheckpointError(f'{path}: the state_dict{where} is empty')
    return cleaned


def _unwrap(net):
    if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return net.module
    return net


def _apply_key_map(state_dict, key_map):
    """key_map: {old_prefix: new_prefix} (longest prefix wins) or a callable key -> key (None drops it)."""
    if key_map is None:
        return state_dict
    mapped = OrderedDict()
    for key, value in state_dict.items():
        if callable(key_map):
            new_key = key_map(key)
        else:
            new_key = key
            for old in sorted(key_map, key=len, reverse=True):
                if key.startswith(old):
                    new_key = key_map[old] + key[len(old):]
                    break
        if new_key is not None:
            mapped[new_key] = value
    return mapped


def _listing(title, items):
    shown = ', '.join(items[:_MAX_LISTED]) + (', ...' if len(items) > _MAX_LISTED else '')
    return f'{title} ({len(items)}): {shown}'


def load_weights(net, path, strict=True, param_key='auto', drop_prefixes=('loss.', ), key_map=None, logger=None):
    """Load a checkpoint into ``net`` (a DataParallel/DDP wrapper is unwrapped).

    File keys the network does not have are dropped, with a logged count, when they start with
    one of ``drop_prefixes`` or belong to a top-level part the network lacks altogether (e.g.
    taming's ``loss.*``, or ``refine.*`` of a VQIR checkpoint loaded into a VQGAN). Remaining
    differences are missing keys, unexpected keys (under a part the network has) and mis-shaped
    keys: with ``strict`` they raise CheckpointError listing them; otherwise the matching keys
    are loaded and the differences are logged as a warning.

    Returns:
        LoadReport.
    """
    logger = logger or get_root_logger()
    path = os.fspath(path)
    net = _unwrap(net)
    net_name = type(net).__name__
    state_dict = _apply_key_map(load_state_dict(path, param_key=param_key), key_map)
    own = net.state_dict()
    own_parts = {k.split('.')[0] for k in own}

    report = LoadReport()
    usable = OrderedDict()
    for key, value in state_dict.items():
        if key in own:
            if tuple(value.shape) != tuple(own[key].shape):
                report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
            else:
                usable[key] = value
        elif key.startswith(tuple(drop_prefixes)) or key.split('.')[0] not in own_parts:
            report.dropped.append(key)
        else:
            report.unexpected.append(key)
    # BatchNorm restores a missing counter itself (checkpoints from before it existed)
    report.missing = [k for k in own if k not in state_dict and not k.endswith('num_batches_tracked')]

    if report.dropped:
        groups = Counter(k.split('.')[0] + '.*' for k in report.dropped)
        logger.info(f'{path}: dropped {len(report.dropped)} keys not used by {net_name} (' +
                    ', '.join(f'{g}: {n}' for g, n in groups.most_common()) + ')')

    problems = []
    if report.missing:
        problems.append(_listing('missing', report.missing))
    if report.unexpected:
        problems.append(_listing('unexpected', report.unexpected))
    if report.mismatched:
        problems.append(
            _listing('mis-shaped', [f'{k} (file {list(a)} vs network {list(b)})' for k, a, b in report.mismatched]))
    if problems:
        summary = (f'{path}: does not match {net_name}: {len(report.missing)} missing, '
                   f'{len(report.unexpected)} unexpected, {len(report.mismatched)} mis-shaped keys')
        if strict:
            raise CheckpointError('\n  '.join([summary] + problems))
        logger.warning('\n  '.join([summary + ' (non-strict: loading the rest)'] + problems))

    net.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    logger.info(f'{path}: loaded {report.loaded} tensors into {net_name}' +
                (f' (param_key {param_key!r})' if param_key not in ('auto', None) else ''))
    return report


# ----------------------------------------------------------------------------------------------
# writing


def _to_cpu(obj):
    """Tensors (also inside dicts, lists and tuples) detached and moved to CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return OrderedDict((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def atomic_torch_save(obj, path):
    """torch.save(obj, path) atomically (for training states; tensors are saved where they are)."""

    def write(tmp_path):
        with open(tmp_path, 'wb') as f:
            torch.save(obj, f)

    atomic_write(path, write)


def save_state_dict(state_dict_or_obj, path, param_key=None):
    """Save network parameters atomically, tensors on CPU, keys without a leading ``module.``.

    Args:
        state_dict_or_obj: a state_dict, or a network (its state_dict is saved).
        path: ``.safetensors`` writes safetensors (flat, contiguous tensors); anything else torch.save.
        param_key: wrap as ``{param_key: state_dict}`` (basicsr's 'params'/'params_ema'); torch.save only.
    """
    path = os.fspath(path)
    if isinstance(state_dict_or_obj, nn.Module):
        state_dict_or_obj = _unwrap(state_dict_or_obj).state_dict()
    if not isinstance(state_dict_or_obj, Mapping):
        raise TypeError(f'save_state_dict({path}): expected a state_dict or a network, '
                        f'got {type(state_dict_or_obj).__name__}')
    state_dict = OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, _to_cpu(v)) for k, v in state_dict_or_obj.items())

    if path.endswith('.safetensors'):
        if param_key is not None:
            raise ValueError(f'save_state_dict({path}): safetensors files hold one flat state_dict; '
                             f'param_key {param_key!r} is not supported')
        from safetensors.torch import save_file
        tensors, seen = {}, set()
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f'save_state_dict({path}): entry {key!r} is a {type(value).__name__}, not a tensor')
            value = value.contiguous()
            storage = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
            if storage in seen:  # safetensors refuses tensors that share memory
                value = value.clone()
            seen.add((value.untyped_storage().data_ptr(), value.untyped_storage().nbytes()))
            tensors[key] = value
        atomic_write(path, lambda tmp_path: save_file(tensors, tmp_path))
    else:
        atomic_torch_save({param_key: state_dict} if param_key is not None else state_dict, path)


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
    """Restore what :func:`get_rng_state` returned (CUDA states only with the same number of GPUs)."""
    torch.set_rng_state(state['torch'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state['random']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
