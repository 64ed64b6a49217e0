#!/usr/bin/env python
"""Speed, memory and FLOP rate of VQIR, optionally side by side with the reference implementation.

Networks: the released configuration (stage 2, ch 128, ch_mult [1, 1, 2, 2, 4], 2 residual blocks,
z_channels = embed_dim = 256, 1024 codes, attn_mult [3, 3]; stage 1 for stage-1 training) at 16x
and 32x, with random weights: the networks' own initialisation, except that parameters it sets
to exactly zero (biases, the last conv of every coupling subnet) are drawn from N(0, 0.01^2), so
that every layer changes the outputs that the reference comparison checks. Speed does not
depend on the values.

Cases (``--only``; each runs in its own child process, so that its peak memory is its own):

  down        HR -> 8-bit LR, ``vqir.inference.Rescaler.downscale`` (tiled above the Rescaler's
              threshold of 2048 x 1024 pixels, or as ``--tile`` / ``--tile-overlap`` say)
  up          LR -> reconstructions, ``Rescaler.upscale`` (the LR comes from ``downscale``, untimed)
  roundtrip   ``Rescaler.roundtrip`` (both halves)
  train1      one stage-1 iteration: the IFRM learns, the VQGAN is frozen; LR with uniform noise;
              guide (0.5) + feature (1) + Gram (1) losses; Adam (lr 1e-4, betas 0.9/0.96)
  train2      one stage-2 iteration: the MSRM learns; per level L1 (1) + Laplacian edge (0.05), on
              Level_1 LPIPS (1, VGG with a random backbone: no weights are downloaded) + hinge GAN
              (0.1); then one step of basicsr's U-Net discriminator (spectral norm)
  train       train1 and train2
  precision   the round trip of a photo (scikit-image's astronaut, resized) in float32 and in half
              precision (fp16 on CUDA, bf16 on CPU; or ``--dtype``), alternately: speed-up, PSNR of
              both reconstructions against the photo (Y channel, as papers report) and between them,
              LR pixels that differ. With random weights only the differences mean something; give a
              trained network with ``--weights`` (an official VQIR ``.pth`` or a stage-2 ``net_g``).
              Sizes above the automatic tiling threshold are skipped.

  With ``--reference DIR``:
  ref_forward ours' and the reference's full ``forward(x, is_train=False)`` with the same weights,
              timed alternately in one process (so both see the same load), plus ours' ``up``
              only; the largest output differences; FLOPs of both. Sizes above the automatic
              tiling threshold are left to ref_memory.
  ref_train   the same training iteration (train1 / train2, losses built once, identically) on
              both networks, alternately, with identical discriminators.
  ref_memory  peak memory at ``--memory-size`` (default 2040x1356, cropped to a multiple of the
              scale as the reference's datasets do): ours through the Rescaler (tiled), ours'
              plain forward on the whole image, the reference's plain forward on the whole image,
              and the reference as its test loop runs it ('ref_tiled': from 2048 x 1024 pixels on,
              2 x 1 tiles with 128 px of context); the memory target compares 'ours' with
              'ref_tiled' when it was measured. A child that runs out of the
              ``--memory-limit-gb`` budget is reported as such.

Kernel ceiling (``ref_forward``, ``ref_train``): after the timed runs, one run of each side under
``torch.profiler`` gives the share of ours' operator time spent in convolutions and matrix
products (``addmm``, ``mm``, ``bmm``, ...); the measured speed-up divided by that share is the
speed-up ours would have if every other operator took no time. A target above it cannot be met
with the convolution and GEMM kernels that both sides call; the target lines print it.

Every timing is the median (and minimum) of ``--repeats`` runs after ``--warmup`` runs; the first
warm-up run counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` (CPU flash attention
is added to its formulas). Wall time and process CPU time (all threads) are both recorded: on
a loaded machine the CPU time is the steadier figure. Each child also measures the machine's
own throughput on a plain 128-channel 3x3 conv (128 x 128, batch 1) just before its case, in
the case's dtype and memory format; ``% conv`` is the case's GFLOP/s against it.

Peak memory: on CPU the peak resident set size of the child from the moment its network and
inputs are ready to the end (``VmHWM`` after resetting it through ``/proc/self/clear_refs``;
elsewhere ``ru_maxrss`` of the whole child). It includes the Python process with its libraries
(about 0.8 GB) and the network. On CUDA: ``torch.cuda.max_memory_allocated``.

The reference (github.com/huai-chang/VQIR) is never part of this repository. Make a checkout
outside it, e.g.::

    mkdir -p /tmp/vqir_ref && git -C <clone of huai-chang/VQIR> archive HEAD | tar -x -C /tmp/vqir_ref

Its modules import as ``archs.*`` / ``utils.*`` with DIR/vqir on ``sys.path``. It imports
``timm.models.layers.trunc_normal_`` (used only to initialise weights): without timm, that one
name is provided in ``sys.modules`` as ``torch.nn.init.trunc_normal_``. It imports
``einops.rearrange`` (a permute/reshape in its codebook lookup): without einops, a minimal
``rearrange`` for its patterns is provided the same way. Its stage-1 LR quantiser draws its
training noise with ``.cuda()``; off CUDA, that one method is replaced by the same computation
on the input's device. The JSON lists which of these substitutions were made.

CPU allocator: by default (``--malloc entry``) each child sets glibc malloc as vqir's entry points
do: the training cases keep freed memory in the process as ``train.py`` does
(``vqir.utils.allocator.keep_freed_memory``: no per-block mmap, no trimming), the inference cases
keep glibc's defaults as ``vqir-rescale`` and ``test.py`` do. ``--malloc vqir`` keeps freed memory
in every case, ``--malloc default`` nowhere. Large tensors go on transparent huge pages as
``import vqir`` asks PyTorch to (``vqir.utils.allocator.use_huge_pages``), except with
``--malloc default`` (or ``THP_MEM_ALLOC_ENABLE=0`` in the environment). In the ``ref_*`` cases
both implementations run in one process, so the same settings apply to both.

Two flags work through torch's generic mechanisms and are reported as such: ``--channels-last``
(no project option) converts our network with ``Module.to(memory_format=torch.channels_last)``
(its inputs follow); ``--compile`` calls ``Module.compile()`` on the parts that the project's own
``Rescaler(compile=True)`` compiles (VQGAN encoder and decoder, MSRM), so that the plain forwards
and the training steps run them compiled too. ``--dtype bf16/fp16`` uses the
Rescaler's own ``bf16`` / ``half`` options (training and plain forwards run under
``torch.autocast``). None of these flags touches the reference, which always runs as published
(float32, NCHW), so that a comparison shows both the speed and the output difference they cause.

Examples::

    python scripts/benchmark.py --quick --device cpu --threads 2
    python scripts/benchmark.py --quick --reference /tmp/vqir_ref --only ref_forward,ref_train,ref_memory
    python scripts/benchmark.py --sizes 2040x1356 --scales 16 --only roundtrip --repeats 1
    python scripts/benchmark.py --device cuda --only precision --weights pretrained/vqir_x16.pth --scales 16
    python scripts/benchmark.py --list            # case ids, for --skip 'cpu/x32/*'
    python scripts/benchmark.py --smoke --json /tmp/smoke.json   # tiny network, seconds
"""
import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import fnmatch
import functools
import gc
import importlib
import inspect
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
import types
from collections import OrderedDict
from os import path as osp

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# '--malloc default' also leaves PyTorch's page size alone, which must be decided before torch's
# first allocation (vqir.utils.allocator); the children inherit it
if re.search(r'(^|\s)--malloc[= ]default(\s|$)', ' '.join(sys.argv[1:])):
    os.environ['VQIR_MALLOC'] = 'default'

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import vqir  # noqa: E402,F401  (registers the architectures and losses)
from vqir.archs.vqir_arch import VQIR  # noqa: E402
from vqir.inference import DEFAULT_AUTO_TILE_PIXELS, DEFAULT_TILE_OVERLAP, Rescaler, official_network_options  # noqa: E402
from vqir.utils.allocator import keep_freed_memory, transparent_huge_page_mode  # noqa: E402
from vqir.utils.atomic_file import atomic_write_bytes  # noqa: E402

DEFAULT_SIZES = '256,512,1024,2040x1356'
QUICK_SIZES = '256,512'
SMOKE_SIZES = '96x64'
DEFAULT_MEMORY_SIZE = '2040x1356'
MAIN_OPS = ('down', 'up', 'roundtrip', 'train1', 'train2', 'precision')
REFERENCE_OPS = ('ref_forward', 'ref_train', 'ref_memory')
TRAINING_OPS = ('train1', 'train2', 'ref_train')
MEMORY_VARIANTS = ('ours', 'ours_plain', 'ref', 'ref_tiled')
# what --compile compiles: the parts that Rescaler(compile=True) compiles
COMPILED_PARTS = ('encoder', 'decoder', 'refine')
OP_ALIASES = {'train': ('train1', 'train2')}

# A tiny network with the same structure (every part, both MSRM branches) for --smoke.
SMOKE_NETWORK = OrderedDict(
    type='VQIR', in_channels=3, out_channels=3, ch=64, ch_mult=[1, 1, 1, 1, 1], double_z=False, num_res_blocks=1,
    z_channels=64, n_embed=64, embed_dim=64, attn_mult=[1, 1])

# Training set-up of the paper / reference configs.
ADAM = dict(lr=1e-4, betas=(0.9, 0.96))
CONV_PROBE = dict(channels=128, size=128)  # the plain conv whose throughput is the yardstick
SMOKE_CONV_PROBE_SIZE = 32

# The reference's targets (facts measured on a 2-core AVX2 machine; see the issue / report).
TARGETS = OrderedDict(
    forward_speedup=1.5, conv_fraction=0.85, up_speedup=2.0, memory_ratio=0.5, train_speedup=1.5,
    half_speedup=2.0, half_psnr_db=0.05)


# ================================================================================ small helpers
def parse_size(text):
    """'256' -> (256, 256); '2040x1356' (width x height) -> (1356, 2040) as (H, W)."""
    match = re.fullmatch(r'\s*(\d+)(?:\s*x\s*(\d+))?\s*', text)
    if not match:
        raise argparse.ArgumentTypeError(f'size {text!r}: expected N or WIDTHxHEIGHT, e.g. 512 or 2040x1356')
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) else width
    return height, width


def size_name(hw):
    return f'{hw[1]}x{hw[0]}'


def parse_list(text, convert=str, what='value'):
    items = [t.strip() for t in text.split(',') if t.strip()]
    try:
        return [convert(t) for t in items]
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise argparse.ArgumentTypeError(f'{what} list {text!r}: {err}') from None


def median(values):
    return statistics.median(values) if values else None


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return [f for f in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile') if f in flags]
    except OSError:
        pass
    return []


def mem_available_bytes():
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def git_commit():
    try:
        out = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ================================================================================ peak memory
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library('c')
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    return _LIBC


def release_freed_memory():
    """Return memory freed by Python/torch to the OS (glibc keeps small freed blocks otherwise),
    so that a later peak starts from what is really in use."""
    gc.collect()
    libc = _libc()
    if libc and hasattr(libc, 'malloc_trim'):
        libc.malloc_trim(0)


def _status_kb(field):
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of this process from ``reset()`` on: resident set (CPU) or CUDA allocations."""

    def __init__(self, device):
        self.device = device
        self.method = None

    def reset(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = 'torch.cuda.max_memory_allocated'
            return
        release_freed_memory()
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # resets VmHWM to the current resident set
            self.method = 'VmHWM after clear_refs (peak RSS from model ready)'
        except OSError:
            self.method = 'ru_maxrss (peak RSS of the whole child)'

    def current_rss(self):
        kb = _status_kb('VmRSS')
        return kb * 1024 if kb is not None else None

    def peak(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            return {'peak_bytes': torch.cuda.max_memory_allocated(self.device),
                    'peak_reserved_bytes': torch.cuda.max_memory_reserved(self.device), 'method': self.method}
        kb = _status_kb('VmHWM') if self.method and self.method.startswith('VmHWM') else None
        if kb is None:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kb = maxrss / 1024 if sys.platform == 'darwin' else maxrss  # bytes on macOS, kB on Linux
        return {'peak_bytes': int(kb * 1024), 'method': self.method}


def limit_address_space(limit_bytes):
    """Make allocations beyond ``limit_bytes`` more than now fail with an error instead of
    waking the kernel's out-of-memory killer (which may pick another process)."""
    if not limit_bytes:
        return None
    size_kb = _status_kb('VmSize')
    if size_kb is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    new = size_kb * 1024 + int(limit_bytes)
    if hard != resource.RLIM_INFINITY:
        new = min(new, hard)
    resource.setrlimit(resource.RLIMIT_AS, (new, hard))
    return new


def is_out_of_memory(err):
    text = str(err)
    return isinstance(err, MemoryError) or 'can\'t allocate memory' in text or 'out of memory' in text.lower()


# ================================================================================ FLOPs
def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out, query, key, value)


def extra_flop_formulas():
    """FlopCounterMode knows the CUDA attention kernels; the CPU flash kernel is added here."""
    formulas = {}
    ops = torch.ops.aten
    if hasattr(ops, '_scaled_dot_product_flash_attention_for_cpu'):
        formulas[ops._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(ops, '_scaled_dot_product_flash_attention_for_cpu_backward'):
        formulas[ops._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return formulas


def count_flops(fn):
    """Run ``fn`` once under FlopCounterMode -> ({'total', 'conv', 'by_op', 'by_part'} in FLOPs, 2 per
    multiply-add; fn's return value)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        value = fn()
    counts = counter.get_flop_counts()
    by_op = {str(op).replace('aten.', ''): int(n) for op, n in counts.get('Global', {}).items()}
    # top-level parts: 'VQIR.encoder' (a plain forward), or the parts the Rescaler calls directly ('Decoder')
    names = [n for n in counts if n != 'Global']
    roots = [n for n in names if '.' not in n]
    if roots == ['VQIR'] or (len(roots) == 1 and any(n.startswith(roots[0] + '.') for n in names)):
        names = [n for n in names if n.count('.') == 1]
    else:
        names = roots
    parts = {name: int(sum(counts[name].values())) for name in names}
    flops = {'total': int(counter.get_total_flops()),
             'conv': int(sum(n for op, n in by_op.items() if 'convolution' in op)), 'by_op': by_op, 'by_part': parts}
    return flops, value


@contextlib.contextmanager
def eager(modules):
    """Temporarily run ``Module.compile()``d modules eagerly (FLOP counting, profiling)."""
    saved = [(m, m.__dict__.get('_compiled_call_impl')) for m in modules]
    for m, _ in saved:
        m.__dict__['_compiled_call_impl'] = None
    try:
        yield
    finally:
        for m, impl in saved:
            m.__dict__['_compiled_call_impl'] = impl


# ================================================================================ set-up inside a child
def precision_context(device, dtype):
    if dtype == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if dtype == 'bf16' else torch.float16)


def network_options(spec, stage):
    if spec['smoke']:
        opt = copy.deepcopy(SMOKE_NETWORK)
        opt.update(stage=stage, ir_scale=spec['scale'])
        if stage == 1:
            del opt['attn_mult']
        return opt
    return official_network_options(spec['scale'], stage)


def build_ours(spec, stage):
    """Our VQIR with the benchmark's random weights (deterministic from the seed), in eval mode, on CPU."""
    opt = network_options(spec, stage)
    opt.pop('type')
    torch.manual_seed(spec['seed'])
    net = VQIR(**opt)
    generator = torch.Generator().manual_seed(spec['seed'] + 1)
    with torch.no_grad():
        for param in net.parameters():
            if param.requires_grad and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return net.eval()


def apply_our_flags(net, spec, device):
    """--channels-last / --compile on our network (torch's generic mechanisms; see the module docstring)."""
    net.to(device)
    if spec['channels_last']:
        net.to(memory_format=torch.channels_last)
    compiled = []
    if spec['compile']:
        for name in COMPILED_PARTS:
            module = getattr(net, name, None)
            if module is not None:
                module.compile()
                compiled.append(module)
    return compiled


def make_rescaler(net, spec, device, size_mode='pad'):
    kwargs = dict(device=device, tile=spec['tile'], tile_overlap=spec['tile_overlap'], size_mode=size_mode,
                  half=spec['dtype'] == 'fp16', bf16=spec['dtype'] == 'bf16')
    if spec.get('auto_tile_pixels'):
        kwargs['auto_tile_pixels'] = spec['auto_tile_pixels']
    return Rescaler(net, **kwargs)


def tiling_of(rescaler, height, width):
    """(processed H, W, tile core size or None, number of tiles) of the Rescaler for an image."""
    net_h, net_w = rescaler.network_size(height, width)
    tile = rescaler.tile_size(net_h, net_w)
    if tile is None:
        return net_h, net_w, None, 1
    s = rescaler.ir_scale
    count = math.ceil((net_h // s) / (tile // s)) * math.ceil((net_w // s) / (tile // s))
    return net_h, net_w, tile, count


def random_images(batch, height, width, device, seed):
    """Smooth random RGB images in [0, 1]: (B, 3, H, W) (noise upsampled, so not pure noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // 8), max(2, width // 8), generator=generator)
    img = F.interpolate(coarse, size=(height, width), mode='bilinear', align_corners=False)
    img = (img + 0.1 * torch.rand(batch, 3, height, width, generator=generator)).clamp_(0, 1)
    return img.to(device)


def conv_throughput(spec, device, plain=True, repeats=5, warmup=2):
    """GFLOP/s of a plain conv: 128 -> 128 channels, 3x3, 128 x 128 pixels (32 x 32 with --smoke),
    batch 1, inference. ``plain``: float32, NCHW (the yardstick); else in the case's dtype and
    memory format."""
    dtype = 'fp32' if plain else spec['dtype']
    channels_last = False if plain else spec['channels_last']
    c, s = CONV_PROBE['channels'], SMOKE_CONV_PROBE_SIZE if spec['smoke'] else CONV_PROBE['size']
    torch.manual_seed(0)
    conv = nn.Conv2d(c, c, 3, padding=1).to(device)
    x = torch.randn(1, c, s, s, device=device)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    flops = 2 * c * c * 9 * s * s
    times = []
    with torch.inference_mode(), precision_context(device, dtype):
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            conv(x)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return flops / median(times) / 1e9


def conv_yardsticks(spec, device):
    """{'conv_gflop_per_s': plain conv, 'conv_gflop_per_s_case_format': same conv in the case's dtype/format}."""
    result = {'conv_gflop_per_s': conv_throughput(spec, device)}
    if spec['dtype'] != 'fp32' or spec['channels_last']:
        result['conv_gflop_per_s_case_format'] = conv_throughput(spec, device, plain=False)
    return result


def timing_summary(walls, cpus):
    return {'wall_s': walls, 'cpu_s': cpus, 'median_s': median(walls), 'min_s': min(walls) if walls else None,
            'median_cpu_s': median(cpus)}


def measure(fn, device, repeats, warmup, flops_modules=()):
    """Warm up (the first warm-up run counts FLOPs), then time ``repeats`` runs of ``fn``."""
    flops = None
    for i in range(warmup):
        if i == 0:
            with eager(flops_modules):
                flops, _ = count_flops(fn)
        else:
            fn()
    walls, cpus = [], []
    for _ in range(repeats):
        sync(device)
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    result = timing_summary(walls, cpus)
    result['flops'] = flops
    return result


def profiled_operators(fn, device):
    """Per-operator totals (torch.profiler key averages) of one run of ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    return prof.key_averages()


def top_operators(events, top):
    """The ``top`` operators of ``profiled_operators`` by self CPU time."""
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{'op': e.key, 'self_cpu_s': e.self_cpu_time_total / 1e6, 'share': e.self_cpu_time_total / total,
             'calls': e.count} for e in rows]


# Operators that are convolutions (forward and backward, every backend) or dense matrix products;
# their wrappers (aten::convolution, aten::linear, ...) are included, with little self time.
CONV_OP_WORDS = ('convolution', 'conv2d', 'conv_depthwise')
MATMUL_OPS = frozenset(('aten::addmm', 'aten::mm', 'aten::bmm', 'aten::baddbmm', 'aten::addbmm', 'aten::matmul',
                        'aten::linear', 'aten::_addmm_activation'))


def kernel_time_split(events, device):
    """{'total_s', 'conv_s', 'matmul_s'} of ``profiled_operators``: summed self times of the operators
    (CPU time on CPU, device time on CUDA). Attention kernels count as neither."""
    split = {'total_s': 0.0, 'conv_s': 0.0, 'matmul_s': 0.0}
    for event in events:
        if device.type == 'cuda':
            seconds = getattr(event, 'self_device_time_total', getattr(event, 'self_cuda_time_total', 0)) / 1e6
        else:
            seconds = event.self_cpu_time_total / 1e6
        split['total_s'] += seconds
        name = event.key.lower()
        if any(word in name for word in CONV_OP_WORDS):
            split['conv_s'] += seconds
        elif event.key in MATMUL_OPS:
            split['matmul_s'] += seconds
    return split


def kernel_ceiling(ours_split, ours_s, ref_s):
    """The speed-up over the reference that ours would reach if everything but its convolutions and
    matrix products took no time: the measured speed-up ``ref_s / ours_s`` (alternating medians)
    divided by the share of those kernels in ours' profiled run (``kernel_time_split``). A share
    within one run is steadier on a loaded machine than times from separate profiled runs."""
    share = (ours_split['conv_s'] + ours_split['matmul_s']) / ours_split['total_s'] if ours_split['total_s'] else 0
    return ref_s / ours_s / share if share > 0 and ours_s > 0 else None


def add_rates(result, conv_gflops):
    flops = result.get('flops')
    if flops and result.get('median_s'):
        result['gflops'] = flops['total'] / 1e9
        result['gflop_per_s'] = flops['total'] / result['median_s'] / 1e9
        if conv_gflops:
            result['conv_fraction'] = result['gflop_per_s'] / conv_gflops
    return result


# ================================================================================ training steps
def freeze_all_but(net, part):
    for name, child in net.named_children():
        child.requires_grad_(name == part)
    # fixed filters stay fixed (the IFRM's Haar weights are parameters with requires_grad False)
    if part == 'icrm':
        for pname, param in net.icrm.named_parameters():
            if pname.endswith('haar_weights'):
                param.requires_grad_(False)
    return [p for p in getattr(net, part).parameters() if p.requires_grad]


def build_losses(spec, device):
    """The training losses (reference weights), built once so that both networks of a comparison
    use the very same modules (LPIPS with a random backbone included)."""
    from basicsr.losses.basic_loss import L1Loss
    from basicsr.losses.gan_loss import GANLoss

    from vqir.losses.edge_loss import LaplacianEdgeLoss
    from vqir.losses.ifrm_loss import FeatureRecoveryLoss, GramLoss, LRGuidanceLoss
    from vqir.losses.lpips_loss import LPIPSLoss
    if spec['stage'] == 1:
        return {'guide': LRGuidanceLoss(0.5), 'feature': FeatureRecoveryLoss(1.0), 'gram': GramLoss(1.0)}
    torch.manual_seed(spec['seed'] + 5)
    return {'pixel': L1Loss(loss_weight=1.0), 'edge': LaplacianEdgeLoss(loss_weight=0.05).to(device),
            'lpips': LPIPSLoss(loss_weight=1.0, net='alex' if spec['smoke'] else 'vgg',
                               pretrained_backbone=False).to(device),
            'gan': GANLoss('hinge', loss_weight=0.1)}


class Stage1Step:
    """One stage-1 iteration on any VQIR-like network with the reference's forward signature."""

    def __init__(self, net, losses, device, dtype):
        self.net, self.device, self.dtype = net, device, dtype
        self.params = freeze_all_but(net, 'icrm')
        net.train()
        self.optimizer = torch.optim.Adam(self.params, **ADAM)
        self.guide, self.feature, self.gram = losses['guide'], losses['feature'], losses['gram']
        self.scaler = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None

    def __call__(self, batch):
        with precision_context(self.device, self.dtype):
            out = self.net(batch['hr'], is_train=True)
            loss = (self.guide(out['LR'].float(), batch['lr']) +
                    self.feature(out['re_quant_feat'].float(), out['quant_feat'].float()) +
                    self.gram(out['re_quant_feat'].float(), out['quant_feat'].float()))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return float(loss.detach())


class Stage2Step:
    """One stage-2 iteration (MSRM step, then discriminator step) on any VQIR-like network."""

    def __init__(self, net, discriminator, losses, device, dtype):
        self.net, self.net_d, self.device, self.dtype = net, discriminator, device, dtype
        self.params = freeze_all_but(net, 'refine')
        net.train()
        self.params_d = list(discriminator.parameters())
        self.optimizer = torch.optim.Adam(self.params, **ADAM)
        self.optimizer_d = torch.optim.Adam(self.params_d, **ADAM)
        self.pixel, self.edge, self.lpips, self.gan = losses['pixel'], losses['edge'], losses['lpips'], losses['gan']
        self.scaler = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None
        self.scaler_d = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None

    def _step(self, loss, optimizer, scaler):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def __call__(self, batch):
        targets = batch['levels']
        self.net_d.requires_grad_(False)
        with precision_context(self.device, self.dtype):
            out = self.net(targets['Level_1'], is_train=True)
            levels = {k: out[k].float() for k in targets}
            loss = sum(self.pixel(levels[k], t) + self.edge(levels[k], t) for k, t in targets.items())
            loss = loss + self.lpips(levels['Level_1'], targets['Level_1'])
            loss = loss + self.gan(self.net_d(levels['Level_1']), True, is_disc=False)
        self._step(loss, self.optimizer, self.scaler)
        self.net_d.requires_grad_(True)
        with precision_context(self.device, self.dtype):
            loss_d = (self.gan(self.net_d(targets['Level_1']), True, is_disc=True) +
                      self.gan(self.net_d(levels['Level_1'].detach()), False, is_disc=True))
        self._step(loss_d, self.optimizer_d, self.scaler_d)
        return float(loss.detach()), float(loss_d.detach())


def build_discriminator(spec, device):
    from basicsr.archs.discriminator_arch import UNetDiscriminatorSN
    torch.manual_seed(spec['seed'] + 7)
    return UNetDiscriminatorSN(num_in_ch=3, num_feat=32 if spec['smoke'] else 64, skip_connection=True).to(device)


def training_batch(spec, device):
    """A training batch: HR crops in [-1, 1] and their bicubic (antialiased) LR / level targets."""
    crop, batch, scale = spec['crop'], spec['batch'], spec['scale']
    hr = random_images(batch, crop, crop, torch.device('cpu'), spec['seed'] + 3) * 2 - 1

    def down(factor):
        return F.interpolate(hr, scale_factor=1 / factor, mode='bicubic', antialias=True, align_corners=False)

    data = {'hr': hr, 'lr': down(scale), 'levels': {'Level_1': hr, 'Level_2': down(2), 'Level_4': down(4)}}
    return {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in data.items()}


def make_step(net, spec, device, losses, discriminator=None, dtype=None):
    dtype = dtype or spec['dtype']
    if spec['stage'] == 1:
        return Stage1Step(net, losses, device, dtype)
    return Stage2Step(net, discriminator, losses, device, dtype)


# ================================================================================ the reference
def _install_timm_stub():
    """Provide ``timm.models.layers.trunc_normal_`` (weights initialisation only) when timm is absent."""
    timm = types.ModuleType('timm')
    models = types.ModuleType('timm.models')
    layers = types.ModuleType('timm.models.layers')
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    timm.models, models.layers = models, layers
    sys.modules.update({'timm': timm, 'timm.models': models, 'timm.models.layers': layers})


def minimal_rearrange(tensor, pattern, **sizes):
    """einops-style ``rearrange`` for patterns made of axis names and parenthesised groups,
    e.g. 'b c h w -> b h w c', '(b h w) -> b h w', 'b (h w) c -> b c h w' (sizes of decomposed
    groups from keyword arguments). A permute between two reshapes, as einops does."""
    def groups(side):
        return [g.split() if g else [name] for g, name in re.findall(r'\(([^)]*)\)|(\w+)', side)]

    left, right = (groups(side) for side in pattern.split('->'))
    if len(left) != tensor.dim():
        raise ValueError(f'rearrange: pattern {pattern!r} has {len(left)} axes, tensor has {tensor.dim()}')
    axis_size = dict(sizes)
    for dim, group in zip(tensor.shape, left):
        unknown = [a for a in group if a not in sizes]
        known = math.prod(sizes[a] for a in group if a in sizes)
        if len(unknown) > 1:
            raise ValueError(f'rearrange: cannot infer sizes of {unknown} in {pattern!r}')
        if unknown:
            axis_size[unknown[0]] = dim // known
    axes = [a for g in left for a in g]
    order = [a for g in right for a in g]
    x = tensor.reshape([axis_size[a] for a in axes]).permute([axes.index(a) for a in order])
    return x.reshape([math.prod(axis_size[a] for a in g) for g in right])


def _install_einops_stub():
    einops = types.ModuleType('einops')
    einops.rearrange = minimal_rearrange
    sys.modules['einops'] = einops


def check_reference_dir(ref_dir):
    ref_dir = osp.abspath(ref_dir)
    arch = osp.join(ref_dir, 'vqir', 'archs', 'vqir_arch.py')
    if not osp.isfile(arch):
        raise SystemExit(f'--reference {ref_dir}: no vqir/archs/vqir_arch.py there (expected a checkout of '
                         'github.com/huai-chang/VQIR)')
    if osp.commonpath([ref_dir, ROOT]) == ROOT:
        raise SystemExit(f'--reference {ref_dir}: lies inside this repository ({ROOT}); keep the reference '
                         'checkout outside it, e.g. /tmp/vqir_ref')
    return ref_dir


def import_reference(ref_dir):
    """The reference's VQIR class, and the list of substitutions made to import it (see module docstring)."""
    substitutions = []
    try:
        importlib.import_module('timm.models.layers')
    except ImportError:
        _install_timm_stub()
        substitutions.append('timm.models.layers.trunc_normal_ = torch.nn.init.trunc_normal_ (timm not installed)')
    try:
        importlib.import_module('einops')
    except ImportError:
        _install_einops_stub()
        substitutions.append('einops.rearrange = minimal permute/reshape (einops not installed)')
    pkg = osp.join(ref_dir, 'vqir')
    if pkg not in sys.path:
        sys.path.insert(0, pkg)
    module = importlib.import_module('archs.vqir_arch')
    return module.VQIR, substitutions


def _device_safe_quan_forward(x, train=True):
    """The reference's ``Quan.forward`` with its training noise drawn on x's device instead of ``.cuda()``."""
    x = (x + 1.) / 2. * 255.0
    if train:
        out = torch.clamp(x + torch.nn.init.uniform_(torch.zeros_like(x), -0.5, 0.5), 0, 255.)
    else:
        out = torch.clamp(x.round() * 1.0, 0, 255.)
    return (out / 255.0 - 0.5) / 0.5


def build_reference(spec, stage, ours, device):
    """The reference VQIR with our weights (strict load; the names are equal)."""
    ref_cls, substitutions = import_reference(spec['reference'])
    opt = network_options(spec, stage)
    opt.pop('type')
    ref = ref_cls(**opt)
    ref.load_state_dict(ours.state_dict(), strict=True)
    if device.type != 'cuda' and hasattr(ref, 'quan'):
        ref.quan.forward = _device_safe_quan_forward
        substitutions.append('Quan.forward: training noise on the input device instead of .cuda() (no CUDA)')
    return ref.eval().to(device), substitutions


# ================================================================================ case runners (in a child)
def run_rescale_case(spec, device, peak):
    """down / up / roundtrip through the Rescaler."""
    net = build_ours(spec, stage=2)
    compiled = apply_our_flags(net, spec, device)
    rescaler = make_rescaler(net, spec, device)
    height, width = spec['size']
    hr = random_images(spec['batch'], height, width, device, spec['seed'] + 2)
    net_h, net_w, tile, tiles = tiling_of(rescaler, height, width)
    op = spec['op']
    if op == 'down':
        fn = lambda: rescaler.downscale(hr)  # noqa: E731
    elif op == 'up':
        lr = rescaler.downscale(hr)
        fn = lambda: rescaler.upscale(lr, out_size=(height, width))  # noqa: E731
    else:
        fn = lambda: rescaler.roundtrip(hr)  # noqa: E731
    yardsticks = conv_yardsticks(spec, device)
    peak.reset()
    result = measure(fn, device, spec['repeats'], spec['warmup'], compiled)
    result.update(peak.peak())
    result.update(processed=size_name((net_h, net_w)), tile=tile, tiles=tiles, **yardsticks)
    if spec['profile']:
        with eager(compiled):
            result['profile'] = top_operators(profiled_operators(fn, device), spec['profile'])
    return add_rates(result, yardsticks['conv_gflop_per_s'])


def run_train_case(spec, device, peak):
    net = build_ours(spec, stage=spec['stage'])
    compiled = apply_our_flags(net, spec, device)
    discriminator = build_discriminator(spec, device) if spec['stage'] == 2 else None
    step = make_step(net, spec, device, build_losses(spec, device), discriminator)
    batch = training_batch(spec, device)
    yardsticks = conv_yardsticks(spec, device)
    peak.reset()
    result = measure(lambda: step(batch), device, spec['repeats'], spec['warmup'], compiled)
    result.update(peak.peak())
    result.update(yardsticks)
    return add_rates(result, yardsticks['conv_gflop_per_s'])


def photo(height, width, device):
    """scikit-image's astronaut, resized (bicubic, antialiased) to (1, 3, height, width) RGB in [0, 1]."""
    from skimage import data as skdata
    img = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(height, width), mode='bicubic', antialias=True, align_corners=False)
    return img.clamp_(0, 1).to(device)


def psnr_y(img, ref):
    """PSNR on the Y channel of 8-bit images, as the metrics of the test pipeline compute it."""
    from basicsr.metrics import calculate_psnr
    from basicsr.utils import tensor2img
    return float(calculate_psnr(tensor2img(img.float().cpu().clamp(0, 1)), tensor2img(ref.float().cpu()),
                                crop_border=0, test_y_channel=True))


def run_precision_case(spec, device, peak):
    """The round trip of a photo in float32 and in half precision, alternately: speed and PSNR."""
    net = build_ours(spec, stage=2)
    if spec.get('weights'):
        from vqir.utils.checkpoint import load_weights
        load_weights(net, spec['weights'], strict=True, param_key='auto')
    apply_our_flags(net, spec, device)
    half = spec['half_dtype']
    rescalers = OrderedDict((('fp32', Rescaler(net, device=device, tile=spec['tile'], tile_overlap=spec['tile_overlap'])),
                             (half, Rescaler(net, device=device, tile=spec['tile'], tile_overlap=spec['tile_overlap'],
                                             half=half == 'fp16', bf16=half == 'bf16'))))
    height, width = spec['size']
    hr = photo(height, width, device)
    outputs = {name: rescaler.roundtrip(hr) for name, rescaler in rescalers.items()}  # also the warm-up
    for _ in range(max(0, spec['warmup'] - 1)):
        for rescaler in rescalers.values():
            rescaler.roundtrip(hr)
    samples = time_alternately(OrderedDict((name, functools.partial(rescaler.roundtrip, hr))
                                           for name, rescaler in rescalers.items()), device, spec['repeats'])
    (lr32, rec32), (lr_half, rec_half) = [(lr, out['Level_1']) for lr, out in outputs.values()]
    result = {'half_dtype': half, 'weights': spec.get('weights') or 'random', 'processed': size_name((height, width)),
              'psnr_fp32_db': psnr_y(rec32, hr), 'psnr_half_db': psnr_y(rec_half, hr),
              'psnr_half_vs_fp32_db': psnr_y(rec_half, rec32), 'max_abs_diff': _max_abs_diff(rec_half, rec32),
              'lr_pixels_differing': int((lr32 != lr_half).any(dim=1).sum()), 'lr_pixels': lr32[0, 0].numel()}
    for name in rescalers:
        result['fp32' if name == 'fp32' else 'half'] = timing_summary(*samples[name])
    return result


def time_alternately(runs, device, repeats):
    """Time the callables ``runs`` (name -> fn) in turns, the order reversed every other round so
    that all see the same load: {name: ([wall seconds], [process CPU seconds])}."""
    samples = {name: ([], []) for name in runs}
    for i in range(repeats):
        order = list(runs.items()) if i % 2 == 0 else list(reversed(runs.items()))
        for name, fn in order:
            sync(device)
            c0, t0 = cpu_seconds(), time.perf_counter()
            fn()
            sync(device)
            samples[name][0].append(time.perf_counter() - t0)
            samples[name][1].append(cpu_seconds() - c0)
    return samples


def _max_abs_diff(a, b):
    return float((a.float() - b.float()).abs().max())


def run_ref_forward_case(spec, device, peak):
    """Ours and the reference alternately, same weights, same input; agreement; ours' `up`."""
    ours = build_ours(spec, stage=2)
    ref, substitutions = build_reference(spec, 2, ours, device)
    compiled = apply_our_flags(ours, spec, device)
    rescaler = make_rescaler(ours, spec, device, size_mode='mod_crop')
    height, width = spec['size']
    s = spec['scale']
    height, width = height // s * s, width // s * s
    hr01 = random_images(1, height, width, device, spec['seed'] + 2)
    x = hr01 * 2 - 1
    x_ours = x.contiguous(memory_format=torch.channels_last) if spec['channels_last'] else x
    lr01 = rescaler.downscale(hr01)

    def ours_forward():
        with torch.no_grad(), precision_context(device, spec['dtype']):
            return ours(x_ours, is_train=False)

    def ref_forward():  # the reference as published: float32
        with torch.no_grad():
            return ref(x, is_train=False)

    def ours_up():
        return rescaler.upscale(lr01)

    runs = OrderedDict((('ours_forward', ours_forward), ('ref_forward', ref_forward), ('ours_up', ours_up)))
    # the first run of each counts FLOPs and gives the outputs to compare (it is also a warm-up run)
    flops, outputs = {}, {}
    for name, fn in runs.items():
        with eager(compiled):
            flops[name], outputs[name] = count_flops(fn)
    out_ours, out_ref = outputs['ours_forward'], outputs['ref_forward']
    agreement = {k: _max_abs_diff(out_ours[k], out_ref[k]) for k in out_ours if k in out_ref}
    agreement['LR_pixels_differing'] = int((out_ours['LR'] != out_ref['LR']).sum())
    agreement['up_Level_1_vs_ref_forward'] = _max_abs_diff(outputs['ours_up']['Level_1'] * 2 - 1, out_ref['Level_1'])
    del outputs, out_ours, out_ref
    for _ in range(max(0, spec['warmup'] - 1)):
        for fn in runs.values():
            fn()
    conv_before = conv_throughput(spec, device)
    samples = time_alternately(runs, device, spec['repeats'])
    conv_after = conv_throughput(spec, device)
    conv_gflops = median([conv_before, conv_after])
    result = {'agreement': agreement, 'substitutions': substitutions, 'conv_gflop_per_s': conv_gflops,
              'conv_gflop_per_s_before_after': [conv_before, conv_after], 'processed': size_name((height, width))}
    for name in runs:
        entry = timing_summary(*samples[name])
        entry['flops'] = flops[name]
        result[name] = add_rates(entry, conv_gflops)
    # what the targets can reach with these kernels: one profiled run each
    with eager(compiled):
        events = {name: profiled_operators(fn, device) for name, fn in runs.items()}
    split = {name: kernel_time_split(e, device) for name, e in events.items()}
    result['kernel_split'] = split
    ref_s = result['ref_forward']['median_s']
    result['kernel_ceiling'] = {
        'forward': kernel_ceiling(split['ours_forward'], result['ours_forward']['median_s'], ref_s),
        'up': kernel_ceiling(split['ours_up'], result['ours_up']['median_s'], ref_s)}
    if spec['profile']:
        result['profile'] = {name: top_operators(e, spec['profile']) for name, e in events.items()}
    return result


def run_ref_train_case(spec, device, peak):
    """The same training iteration on ours and on the reference, alternately."""
    stage = spec['stage']
    ours = build_ours(spec, stage=stage)
    ref, substitutions = build_reference(spec, stage, ours, device)
    compiled = apply_our_flags(ours, spec, device)
    disc_ours = build_discriminator(spec, device) if stage == 2 else None
    disc_ref = copy.deepcopy(disc_ours) if stage == 2 else None
    losses = build_losses(spec, device)
    steps = OrderedDict((('ours', make_step(ours, spec, device, losses, disc_ours)),
                         ('ref', make_step(ref, spec, device, losses, disc_ref, dtype='fp32'))))
    batch = training_batch(spec, device)
    first_losses, flops = {}, {}
    for name, step in steps.items():
        torch.manual_seed(spec['seed'] + 11)  # the same LR noise for both (stage 1)
        with eager(compiled if name == 'ours' else ()):
            flops[name], first_losses[name] = count_flops(lambda: step(batch))  # noqa: B023
    for _ in range(max(0, spec['warmup'] - 1)):
        for step in steps.values():
            step(batch)
    conv_before = conv_throughput(spec, device)
    samples = time_alternately(OrderedDict((name, functools.partial(step, batch)) for name, step in steps.items()),
                               device, spec['repeats'])
    conv_after = conv_throughput(spec, device)
    conv_gflops = median([conv_before, conv_after])
    result = {'first_step_losses': first_losses, 'substitutions': substitutions, 'conv_gflop_per_s': conv_gflops}
    for name in steps:
        entry = timing_summary(*samples[name])
        entry['flops'] = flops[name]
        result[name] = add_rates(entry, conv_gflops)
    with eager(compiled):
        split = {name: kernel_time_split(profiled_operators(functools.partial(step, batch), device), device)
                 for name, step in steps.items()}
    result['kernel_split'] = split
    result['kernel_ceiling'] = {'step': kernel_ceiling(split['ours'], result['ours']['median_s'],
                                                       result['ref']['median_s'])}
    return result


def run_ref_memory_case(spec, device, peak):
    """Peak memory at a large size: 'ours' (Rescaler, tiled), 'ours_plain' or 'ref' (plain forward),
    'ref_tiled' (the reference's own test loop)."""
    variant = spec['variant']
    ours = build_ours(spec, stage=2)
    substitutions = []
    if variant in ('ref', 'ref_tiled'):
        net, substitutions = build_reference(spec, 2, ours, device)
        del ours
    else:
        apply_our_flags(ours, spec, device)
        net = ours
    s = spec['scale']
    height, width = spec['size'][0] // s * s, spec['size'][1] // s * s
    hr01 = random_images(1, height, width, device, spec['seed'] + 2)
    result = {'variant': variant, 'processed': size_name((height, width)), 'substitutions': substitutions}
    if variant == 'ours':
        rescaler = make_rescaler(net, spec, device, size_mode='mod_crop')
        _, _, result['tile'], result['tiles'] = tiling_of(rescaler, height, width)
        fn = lambda: rescaler.roundtrip(hr01)  # noqa: E731
    elif variant == 'ref_tiled':
        x = hr01 * 2 - 1
        del hr01
        tiles = reference_test_tiles(height, width, s)
        result['tiles'] = len(tiles)

        def fn():
            with torch.no_grad():
                return reference_tiled_forward(net, x, tiles, s)
    else:
        x = hr01 * 2 - 1
        if variant == 'ours_plain' and spec['channels_last']:
            x = x.contiguous(memory_format=torch.channels_last)
        del hr01

        def fn():
            with torch.no_grad(), precision_context(device, spec['dtype']):
                return net(x, is_train=False)

    peak.reset()
    result.update(measure(fn, device, spec['repeats'], spec['warmup']))
    result.update(peak.peak())
    return result


# The reference's test loop (VQIRRFModel.nondist_validation): images of at least 2048 x 1024 pixels
# go through test_tile([2, 1], 128), two tiles side by side, each with 128 px of context.
REFERENCE_TILE_PIXELS = 2048 * 1024
REFERENCE_TILE_GRID = (2, 1)
REFERENCE_TILE_PAD = 128


def _split_evenly(length, parts):
    """(lengths, offsets) of ``parts`` nearly equal pieces, the longer ones last (the reference's split_image)."""
    quotient, remainder = divmod(length, parts)
    lengths = [quotient] * (parts - remainder) + [quotient + 1] * remainder
    return lengths, [sum(lengths[:i]) for i in range(parts)]


def reference_test_tiles(height, width, scale):
    """Tiles of the reference's test loop: [(core (y0, y1, x0, x1), padded (y0, y1, x0, x1))], in HR pixels."""
    if height * width < REFERENCE_TILE_PIXELS:
        return [((0, height, 0, width), (0, height, 0, width))]
    (len_x, ofs_x), (len_y, ofs_y) = (_split_evenly(width // scale, REFERENCE_TILE_GRID[0]),
                                      _split_evenly(height // scale, REFERENCE_TILE_GRID[1]))
    tiles = []
    for oy, ly in zip(ofs_y, len_y):
        for ox, lx in zip(ofs_x, len_x):
            y0, y1, x0, x1 = oy * scale, (oy + ly) * scale, ox * scale, (ox + lx) * scale
            pad = REFERENCE_TILE_PAD
            tiles.append(((y0, y1, x0, x1), (max(y0 - pad, 0), min(y1 + pad, height), max(x0 - pad, 0),
                                             min(x1 + pad, width))))
    return tiles


def reference_tiled_forward(net, x, tiles, scale):
    """The reference's tiled test: forward each padded tile, paste its core into full-size outputs."""
    outputs = {}
    for (y0, y1, x0, x1), (py0, py1, px0, px1) in tiles:
        out = net(x[:, :, py0:py1, px0:px1], is_train=False)
        for name, value in out.items():
            factor = scale if name == 'LR' else int(name.split('_')[1])
            if name not in outputs:
                outputs[name] = x.new_zeros((x.shape[0], value.shape[1], x.shape[2] // factor, x.shape[3] // factor))
            outputs[name][:, :, y0 // factor:y1 // factor, x0 // factor:x1 // factor] = \
                value[:, :, (y0 - py0) // factor:(y1 - py0) // factor, (x0 - px0) // factor:(x1 - px0) // factor]
        del out
    return outputs


def run_conv_case(spec, device, peak):
    samples = [conv_throughput(spec, device) for _ in range(3)]
    result = {'conv_gflop_per_s': median(samples), 'samples': samples}
    if spec['dtype'] != 'fp32' or spec['channels_last']:
        result['conv_gflop_per_s_case_format'] = conv_throughput(spec, device, plain=False)
    return result


RUNNERS = {
    'conv': run_conv_case,
    'down': run_rescale_case,
    'up': run_rescale_case,
    'roundtrip': run_rescale_case,
    'train1': run_train_case,
    'train2': run_train_case,
    'ref_forward': run_ref_forward_case,
    'ref_train': run_ref_train_case,
    'ref_memory': run_ref_memory_case,
    'precision': run_precision_case,
}


def child_main(spec, conn):
    """Entry point of a case's child process: runs the case, sends back a result dict."""
    device = torch.device(spec['device'])
    torch.set_num_threads(spec['threads'])
    torch.manual_seed(spec['seed'])
    result = {'load_before': load_average()}
    if spec['malloc'] == 'vqir' or (spec['malloc'] == 'entry' and spec['op'] in TRAINING_OPS):
        result['malloc_kept_freed_memory'] = keep_freed_memory()
    else:
        result['malloc_kept_freed_memory'] = False
    try:
        if device.type == 'cpu':
            result['address_space_limit'] = limit_address_space(spec['memory_limit'])
        peak = PeakMemory(device)
        result.update(RUNNERS[spec['op']](spec, device, peak))
        result['status'] = 'ok'
    except Exception as err:  # reported per case; the other cases go on
        result['status'] = 'out of memory' if is_out_of_memory(err) else 'error'
        result['error'] = f'{type(err).__name__}: {err}'.splitlines()[0][:300]
        result['traceback'] = traceback.format_exc(limit=8)
    result['load_after'] = load_average()
    try:
        conn.send(result)
    finally:
        conn.close()


# ================================================================================ orchestration (parent)
def case_id(spec):
    """'cpu/x16/down/512x512', 'cpu/x16/train2/b4@256', 'cpu/x16/ref_train/s1/b1@256', 'cpu/x16/ref_memory/ref/2040x1356'."""
    op = spec['op']
    if op == 'conv':
        return f"{spec['device']}/conv"
    parts = [spec['device'], f"x{spec['scale']}", op]
    if op == 'ref_train':
        parts.append(f"s{spec['stage']}")
    if op == 'ref_memory':
        parts.append(spec['variant'])
    parts.append(f"b{spec['batch']}@{spec['crop']}" if op in ('train1', 'train2', 'ref_train') else size_name(spec['size']))
    return '/'.join(parts)


def build_cases(args, devices):
    common = dict(threads=args.threads, dtype=args.dtype, channels_last=args.channels_last, compile=args.compile,
                  tile=args.tile, tile_overlap=args.tile_overlap, smoke=args.smoke, seed=args.seed,
                  reference=args.reference, profile=args.profile, memory_limit=args.memory_limit_bytes,
                  auto_tile_pixels=args.auto_tile_pixels, malloc=args.malloc)
    cases = []
    for device in devices:
        base = dict(common, device=device, repeats=args.repeats, warmup=args.warmup)
        cases.append(dict(base, op='conv', scale=None))
        for scale in args.scales:
            for op in ('down', 'up', 'roundtrip'):
                if op in args.ops:
                    for size in args.sizes:
                        cases.append(dict(base, op=op, scale=scale, size=size, batch=1))
            if 'precision' in args.ops:
                half = args.dtype if args.dtype != 'fp32' else ('fp16' if device == 'cuda' else 'bf16')
                for size in args.sizes:
                    if size[0] * size[1] <= DEFAULT_AUTO_TILE_PIXELS:
                        cases.append(dict(base, op='precision', scale=scale, size=size, batch=1, half_dtype=half,
                                          weights=args.weights))
            for op, stage in (('train1', 1), ('train2', 2)):
                if op in args.ops:
                    for batch in args.train_batches:
                        cases.append(dict(base, op=op, scale=scale, stage=stage, batch=batch, crop=args.train_crop))
            if not args.reference:
                continue
            if 'ref_forward' in args.ops:
                for size in args.sizes:
                    if size[0] * size[1] > DEFAULT_AUTO_TILE_PIXELS:
                        continue  # beyond the reference's whole-image limit: see ref_memory
                    cases.append(dict(base, op='ref_forward', scale=scale, size=size))
            if 'ref_train' in args.ops:
                for stage in (1, 2):
                    for batch in args.reference_train_batches:
                        cases.append(dict(base, op='ref_train', scale=scale, stage=stage, batch=batch,
                                          crop=args.train_crop))
            if 'ref_memory' in args.ops and args.memory_size is not None:
                for variant in args.memory_variants:
                    cases.append(dict(base, op='ref_memory', scale=scale, size=args.memory_size, variant=variant,
                                      repeats=args.memory_repeats, warmup=0))
    for spec in cases:
        spec['id'] = case_id(spec)
        if spec['dtype'] == 'fp16' and spec['device'] == 'cpu':
            spec['skip_reason'] = 'fp16 runs on CUDA only (use --dtype bf16 on CPU)'
    return [c for c in cases if not any(fnmatch.fnmatch(c['id'], pattern) for pattern in args.skip)]


def run_case(spec, timeout):
    """Run one case in a child process (fork on CPU when available, spawn otherwise)."""
    if spec.get('skip_reason'):
        return {'status': 'skipped', 'error': spec['skip_reason']}
    use_fork = spec['device'] == 'cpu' and 'fork' in mp.get_all_start_methods()
    ctx = mp.get_context('fork' if use_fork else 'spawn')
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child_main, args=(spec, sender), daemon=True)
    start = time.perf_counter()
    proc.start()
    sender.close()
    result = None
    if receiver.poll(timeout):
        try:
            result = receiver.recv()
        except EOFError:
            result = None
    else:
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        result = {'status': 'timeout', 'error': f'no result within {timeout} s'}
    proc.join()
    if result is None:
        code = proc.exitcode
        hint = ' (killed: out of memory?)' if code in (-9, 137) else ''
        result = {'status': 'crashed', 'error': f'child exited with code {code}{hint}'}
    result['case_wall_s'] = time.perf_counter() - start
    return result


# ================================================================================ reporting
def fmt(value, spec='.2f', missing='-'):
    if value is None:
        return missing
    return format(value, spec)


def gb(value):
    return None if value is None else value / 1024**3


def print_table(results, op, out, header, id_width, format_row, title=None, strip=''):
    """The cases of ``op`` (one op, or a tuple of ops) as a table: title, header, rule, then a line per
    case, ``format_row(spec, result)`` after its id (``strip`` removed), or its status and error."""
    rows = [r for r in results if r['spec']['op'] in (op if isinstance(op, tuple) else (op, ))]
    if not rows:
        return
    if title:
        out('')
        out(title)
    out(header)
    out('-' * len(header))
    for row in rows:
        spec, r = row['spec'], row['result']
        if r.get('status') != 'ok':
            out(f"{spec['id']:{id_width}s} {r.get('status')}: {r.get('error', '')}")
        else:
            out(f"{spec['id'].replace(strip, '') if strip else spec['id']:{id_width}s} {format_row(spec, r)}")


def print_main_table(results, out):
    def row(spec, r):
        return (f"{r.get('processed', ''):>10s} {fmt(r.get('tiles'), 'd'):>5s} "
                f"{fmt(r['median_s'], '.3f'):>9s} {fmt(r['min_s'], '.3f'):>8s} {fmt(r['median_cpu_s'], '.2f'):>8s} "
                f"{fmt(gb(r.get('peak_bytes'))):>8s} {fmt(r.get('gflops'), '.1f'):>8s} "
                f"{fmt(r.get('gflop_per_s'), '.1f'):>8s} {fmt(r.get('conv_gflop_per_s'), '.1f'):>7s} "
                f"{fmt(100 * r['conv_fraction'] if r.get('conv_fraction') else None, '.0f'):>7s}")

    header = (f"{'case':34s} {'processed':>10s} {'tiles':>5s} {'median s':>9s} {'min s':>8s} {'CPU s':>8s} "
              f"{'peak GB':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'conv':>7s} {'% conv':>7s}")
    print_table(results, tuple(op for op in MAIN_OPS if op != 'precision'), out, header, 34, row)


def print_precision_table(results, out):
    def row(spec, r):
        f, h = r['fp32'], r['half']
        return (f"{r['half_dtype']:>5s} {f['median_s']:8.3f} {h['median_s']:8.3f} {f['median_s'] / h['median_s']:8.2f} "
                f"{r['psnr_fp32_db']:10.3f} {r['psnr_half_db']:10.3f} "
                f"{abs(r['psnr_half_db'] - r['psnr_fp32_db']):8.3f} {r['psnr_half_vs_fp32_db']:10.2f} "
                f"{r['lr_pixels_differing']:>5d}/{r['lr_pixels']:<5d}  {osp.basename(r['weights'])}")

    header = (f"{'case':30s} {'half':>5s} {'fp32 s':>8s} {'half s':>8s} {'speedup':>8s} {'PSNR fp32':>10s} "
              f"{'PSNR half':>10s} {'|dPSNR|':>8s} {'half/fp32':>10s} {'LR px diff':>11s}  weights")
    print_table(results, 'precision', out, header, 30, row, strip='/precision',
                title='Half precision: round trip of a photo, float32 and half alternately (PSNR on Y against '
                'the photo)')


def print_reference_tables(results, out):
    def forward_row(spec, r):
        o, f, u = r['ours_forward'], r['ref_forward'], r['ours_up']
        agree = r['agreement']
        return (f"{o['median_s']:8.3f} {f['median_s']:8.3f} "
                f"{f['median_s'] / o['median_s']:8.2f} {f['median_cpu_s'] / o['median_cpu_s']:6.2f} "
                f"{u['median_s']:8.3f} {f['median_s'] / u['median_s']:6.2f} {fmt(o.get('gflop_per_s'), '.1f'):>9s} "
                f"{fmt(f.get('gflop_per_s'), '.1f'):>9s} {fmt(r['conv_gflop_per_s'], '.1f'):>9s} "
                f"{fmt(100 * o['conv_fraction'] if o.get('conv_fraction') else None, '.0f'):>6s} "
                f"{fmt(o.get('gflops'), '.0f'):>6s}/{fmt(f.get('gflops'), '.0f'):<6s} "
                f"{agree.get('LR', float('nan')):9.2e} {agree.get('Level_1', float('nan')):9.2e}")

    header = (f"{'case':26s} {'ours s':>8s} {'ref s':>8s} {'speedup':>8s} {'CPU x':>6s} {'up s':>8s} "
              f"{'up x':>6s} {'ours GF/s':>9s} {'ref GF/s':>9s} {'conv GF/s':>9s} {'%conv':>6s} "
              f"{'GFLOP o/r':>13s} {'max|dLR|':>9s} {'max|dL1|':>9s}")
    print_table(results, 'ref_forward', out, header, 26, forward_row, strip='/ref_forward',
                title='Reference comparison: full forward(x, is_train=False), same weights, alternating runs')

    def train_row(spec, r):
        o, f = r['ours'], r['ref']
        losses = {k: ' '.join(f'{v:.5g}' for v in (l if isinstance(l, (list, tuple)) else [l]))
                  for k, l in r['first_step_losses'].items()}
        return (f"{o['median_s']:8.3f} {f['median_s']:8.3f} "
                f"{f['median_s'] / o['median_s']:8.2f} {f['median_cpu_s'] / o['median_cpu_s']:6.2f} "
                f"{losses['ours']:>13s} / {losses['ref']:<13s}")

    header = f"{'case':30s} {'ours s':>8s} {'ref s':>8s} {'speedup':>8s} {'CPU x':>6s} {'first-step loss ours / ref':>30s}"
    print_table(results, 'ref_train', out, header, 30, train_row, strip='/ref_train',
                title='Reference comparison: one training iteration (forward + backward + optimiser step)')

    def memory_row(spec, r):
        return (f"{r['processed']:>10s} {fmt(r.get('tiles'), 'd'):>5s} "
                f"{fmt(gb(r.get('peak_bytes'))):>8s} {fmt(r.get('median_s'), '.1f'):>8s} "
                f"{fmt(r.get('median_cpu_s'), '.1f'):>8s}")

    header = f"{'case':40s} {'processed':>10s} {'tiles':>5s} {'peak GB':>8s} {'time s':>8s} {'CPU s':>8s}"
    print_table(results, 'ref_memory', out, header, 40, memory_row,
                title='Reference comparison: peak memory (ours: Rescaler, tiled; plain: whole-image forward)')


def ceiling_note(result, key):
    """The kernel ceiling (see the module docstring) for a target's detail line, when measured."""
    ceiling = result.get('kernel_ceiling', {}).get(key)
    if ceiling is None:
        return ''
    return f'; at most {ceiling:.2f}x while its convolutions and matrix products take the time they took here'


def evaluate_targets(results):
    """The targets against the measured reference comparison (fp32 cases only)."""
    checks = []

    def add(name, value, target, passed, detail):
        checks.append({'target': name, 'value': value, 'required': target, 'passed': passed, 'detail': detail})

    for row in results:
        spec, r = row['spec'], row['result']
        if spec['op'] != 'precision' or spec['device'] != 'cuda' or r.get('status') != 'ok':
            continue  # the half-precision target is a GPU's
        speedup = r['fp32']['median_s'] / r['half']['median_s']
        dpsnr = abs(r['psnr_half_db'] - r['psnr_fp32_db'])
        add('half precision >= 2x faster than fp32, PSNR within 0.05 dB', speedup, TARGETS['half_speedup'],
            speedup >= TARGETS['half_speedup'] and dpsnr <= TARGETS['half_psnr_db'],
            f'{spec["id"]}: {r["half_dtype"]} {r["half"]["median_s"]:.3f} s vs fp32 {r["fp32"]["median_s"]:.3f} s; '
            f'PSNR {r["psnr_half_db"]:.3f} vs {r["psnr_fp32_db"]:.3f} dB ({r["weights"]} weights)')
    results = [row for row in results if row['spec']['dtype'] == 'fp32']
    for row in results:
        spec, r = row['spec'], row['result']
        if r.get('status') != 'ok':
            continue
        where = spec['id']
        if spec['op'] == 'ref_forward':
            o, f, u = r['ours_forward'], r['ref_forward'], r['ours_up']
            speedup = f['median_s'] / o['median_s']
            agree = max(r['agreement'].get('LR', 0.0), r['agreement'].get('Level_1', 0.0))
            add('forward >= 1.5x faster than the reference, same outputs', speedup, TARGETS['forward_speedup'],
                speedup >= TARGETS['forward_speedup'] and agree <= 1e-4,
                f'{where}: {o["median_s"]:.3f} s vs {f["median_s"]:.3f} s; CPU-time ratio '
                f'{f["median_cpu_s"] / o["median_cpu_s"]:.2f}; max |diff| LR/Level_1 {agree:.2e}'
                + ceiling_note(r, 'forward'))
            if o.get('conv_fraction') is not None and f.get('gflops'):
                # the forward's work as the straightforward network counts it (the reference's FLOPs): ours
                # computes fewer (the sub-pixel upsampling convs), which must not count against it
                effective = f['gflops'] / o['median_s']
                fraction = effective / r['conv_gflop_per_s']
                add('forward at >= 85% of the conv throughput', fraction, TARGETS['conv_fraction'],
                    fraction >= TARGETS['conv_fraction'],
                    f'{where}: {f["gflops"]:.0f} GFLOP of the reference forward in {o["median_s"]:.3f} s = '
                    f'{effective:.1f} GFLOP/s vs conv {r["conv_gflop_per_s"]:.1f} GFLOP/s (ours counts '
                    f'{o["gflops"]:.0f} GFLOP: {o["gflop_per_s"]:.1f} GFLOP/s)')
            up = f['median_s'] / u['median_s']
            add('up >= 2x faster than the reference forward', up, TARGETS['up_speedup'], up >= TARGETS['up_speedup'],
                f'{where}: up {u["median_s"]:.3f} s vs reference forward {f["median_s"]:.3f} s'
                + ceiling_note(r, 'up'))
        elif spec['op'] == 'ref_train':
            speedup = r['ref']['median_s'] / r['ours']['median_s']
            add(f'stage-{spec["stage"]} training step >= 1.5x faster', speedup, TARGETS['train_speedup'],
                speedup >= TARGETS['train_speedup'],
                f'{where}: {r["ours"]["median_s"]:.3f} s vs {r["ref"]["median_s"]:.3f} s; CPU-time ratio '
                f'{r["ref"]["median_cpu_s"] / r["ours"]["median_cpu_s"]:.2f}' + ceiling_note(r, 'step'))
    mem = {}
    for row in results:
        spec, r = row['spec'], row['result']
        if spec['op'] == 'ref_memory':
            mem.setdefault((spec['device'], spec['scale'], spec['size']), {})[spec['variant']] = r
    for (device, scale, size), variants in mem.items():
        # the reference as its test loop runs it (tiled) when measured, else its whole-image forward
        ref_variant = 'ref_tiled' if 'ref_tiled' in variants else 'ref'
        ours, ref = variants.get('ours'), variants.get(ref_variant)
        if not ours or not ref or ours.get('status') != 'ok':
            continue
        where = f'{device}/x{scale}/{size_name(size)}'
        if ref.get('status') == 'ok':
            ratio = ours['peak_bytes'] / ref['peak_bytes']
            add('peak memory <= half the reference', ratio, TARGETS['memory_ratio'], ratio <= TARGETS['memory_ratio'],
                f'{where}: {gb(ours["peak_bytes"]):.2f} GB vs {gb(ref["peak_bytes"]):.2f} GB ({ref_variant})')
        else:
            add('peak memory <= half the reference', None, TARGETS['memory_ratio'], None,
                f'{where}: ours {gb(ours["peak_bytes"]):.2f} GB; reference {ref.get("status")}: {ref.get("error")}')
    return checks


def print_targets(checks, out):
    if not checks:
        return
    out('')
    out('Targets')
    for c in checks:
        verdict = {True: 'PASS', False: 'FAIL', None: 'n/a '}[c['passed']]
        value = fmt(c['value'], '.2f')
        out(f"  {verdict} {c['target']}: {value} (required {c['required']}) - {c['detail']}")


def environment(args, devices):
    info = OrderedDict(
        torch=torch.__version__, python=platform.python_version(), threads=args.threads,
        cpu_model=cpu_model(), cpu_count=os.cpu_count(), cpu_flags=cpu_flags(), devices=devices, dtype=args.dtype,
        cpu_capability=getattr(torch.backends.cpu, 'get_cpu_capability', lambda: None)(),
        mkldnn=torch.backends.mkldnn.is_available(), malloc=args.malloc,
        huge_pages=os.environ.get('THP_MEM_ALLOC_ENABLE') == '1', transparent_hugepage=transparent_huge_page_mode(),
        load_average_start=load_average(),
        mem_available_gb=gb(mem_available_bytes()), commit=git_commit(), argv=sys.argv[1:])
    if 'cuda' in devices:
        info['gpu'] = torch.cuda.get_device_name(0)
    return info


def flag_support():
    """Which benchmark flags the project supports itself, and what this script does for the others."""
    params = inspect.signature(Rescaler.__init__).parameters
    support = OrderedDict()
    support['bf16'] = 'Rescaler(bf16=True)' if 'bf16' in params else 'not supported by the Rescaler'
    support['fp16'] = 'Rescaler(half=True), CUDA only' if 'half' in params else 'not supported by the Rescaler'
    support['channels_last'] = ('no Rescaler/VQIR option: the benchmark applies '
                                'Module.to(memory_format=torch.channels_last) to our network')
    support['compile'] = ('Rescaler(compile=True) compiles the encoder, decoder and refine; the benchmark calls '
                          'Module.compile() on the same parts, so that plain forwards and training steps use them too')
    return support


def default_json_path(device_label):
    return osp.join(ROOT, 'results', 'benchmark', f'benchmark_{device_label}.json')


def write_json(path, payload):
    atomic_write_bytes(path, json.dumps(payload, indent=1, default=str).encode('utf-8'))


# ================================================================================ command line
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--device', choices=('cpu', 'cuda', 'all'), default='all',
                        help='all: CPU, and CUDA when present (default)')
    parser.add_argument('--json', default=None, help='output file (default results/benchmark/benchmark_<device>.json)')
    parser.add_argument('--sizes', default=None, help=f'HR sizes, N or WxH (default {DEFAULT_SIZES})')
    parser.add_argument('--scales', default=None, help='rescaling factors (default 16,32)')
    parser.add_argument('--only', default=None,
                        help='cases: ' + ','.join(MAIN_OPS) + ',train (both), and with --reference ' +
                        ','.join(REFERENCE_OPS) + ' (default: all)')
    parser.add_argument('--skip', action='append', default=[], metavar='PATTERN',
                        help="skip cases whose id matches (fnmatch), e.g. 'cpu/x32/*' or '*/2040x1356'; repeatable")
    parser.add_argument('--list', action='store_true', help='print the case ids and exit')
    parser.add_argument('--repeats', type=int, default=None, help='timed runs per case (default 3; 1 with --quick)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs first; the first counts FLOPs (default 1)')
    parser.add_argument('--dtype', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                        help='autocast precision: bf16 (CPU or CUDA), fp16 (CUDA only)')
    parser.add_argument('--channels-last', action='store_true', help='channels_last memory format for our network')
    parser.add_argument('--compile', action='store_true',
                        help='Module.compile() the parts that Rescaler(compile=True) compiles')
    parser.add_argument('--malloc', choices=('entry', 'vqir', 'default'), default='entry',
                        help="CPU allocator: 'entry' as vqir's entry points set it (training cases keep freed "
                        "memory like train.py, inference cases use glibc's defaults like vqir-rescale and test.py), "
                        "'vqir' keep freed memory in every case (vqir.utils.allocator.keep_freed_memory), "
                        "'default' glibc's own everywhere (default entry)")
    parser.add_argument('--threads', type=int, default=None,
                        help=f'torch CPU threads in every case (default {torch.get_num_threads()})')
    parser.add_argument('--tile', type=int, default=None, help='Rescaler tile (default: automatic)')
    parser.add_argument('--tile-overlap', type=int, default=None,
                        help=f'Rescaler tile_overlap (default {DEFAULT_TILE_OVERLAP})')
    parser.add_argument('--auto-tile-pixels', type=int, default=None, help='Rescaler auto_tile_pixels')
    parser.add_argument('--train-batches', default=None, help='training batch sizes (default 1,4)')
    parser.add_argument('--train-crop', type=int, default=None, help='training crop (default 256, the paper\'s)')
    parser.add_argument('--quick', action='store_true', help=f'sizes {QUICK_SIZES}, repeats 1')
    parser.add_argument('--smoke', action='store_true',
                        help=f'tiny network (LPIPS on AlexNet), sizes {SMOKE_SIZES} with small tiles, crop 64, '
                        'batch 1, repeats 1, 16x: seconds, for tests')
    parser.add_argument('--reference', default=None, metavar='DIR',
                        help='checkout of the reference implementation, outside this repository')
    parser.add_argument('--reference-train-batches', default='1', help='batches of ref_train (default 1)')
    parser.add_argument('--memory-size', default=None,
                        help=f"size of ref_memory (default {DEFAULT_MEMORY_SIZE}; 'none' to skip)")
    parser.add_argument('--memory-variants', default='ours,ours_plain,ref,ref_tiled',
                        help='ref_memory variants: ours (Rescaler), ours_plain, ref (whole image), ref_tiled '
                        '(the reference\'s test loop: 2 x 1 tiles, 128 px context, above 2048 x 1024 pixels)')
    parser.add_argument('--memory-repeats', type=int, default=1, help='timed runs of ref_memory (default 1, no warm-up)')
    parser.add_argument('--memory-limit-gb', type=float, default=None,
                        help='address-space budget of a CPU child beyond its start (default 75%% of the '
                        'available memory); 0: no limit')
    parser.add_argument('--case-timeout', type=float, default=None, help='seconds before a case is abandoned')
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='also profile forward cases (torch.profiler) and keep the top N operators')
    parser.add_argument('--weights', default=None,
                        help='precision case: a trained stage-2 VQIR state for the network (official .pth or '
                        'our net_g); default: random weights')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    if args.smoke:
        # tiny network; small tiles so that the tiled paths run too
        args.sizes = args.sizes or SMOKE_SIZES
        args.scales = args.scales or '16'
        args.train_batches = args.train_batches or '1'
        args.train_crop = args.train_crop or 64
        args.repeats = args.repeats or 1
        args.tile_overlap = 16 if args.tile_overlap is None else args.tile_overlap
        args.tile = 32 if args.tile is None else args.tile
        args.memory_size = args.memory_size or '96x64'
    if args.quick:
        args.sizes = args.sizes or QUICK_SIZES
        args.repeats = args.repeats or 1
    args.sizes = parse_list(args.sizes or DEFAULT_SIZES, parse_size, 'size')
    args.scales = parse_list(args.scales or '16,32', int, 'scale')
    if any(s not in (16, 32) for s in args.scales):
        parser.error(f'--scales: 16 and/or 32, got {args.scales}')
    args.train_batches = parse_list(args.train_batches or '1,4', int, 'batch')
    args.reference_train_batches = parse_list(args.reference_train_batches, int, 'batch')
    args.train_crop = args.train_crop or 256
    args.repeats = args.repeats or 3
    args.threads = args.threads or torch.get_num_threads()
    args.memory_size = args.memory_size or DEFAULT_MEMORY_SIZE
    args.memory_size = None if args.memory_size.lower() == 'none' else parse_size(args.memory_size)
    args.tile_overlap = DEFAULT_TILE_OVERLAP if args.tile_overlap is None else args.tile_overlap
    args.memory_variants = parse_list(args.memory_variants, str, 'variant')
    bad = [v for v in args.memory_variants if v not in MEMORY_VARIANTS]
    if bad:
        parser.error(f'--memory-variants: unknown {bad} (known: {", ".join(MEMORY_VARIANTS)})')
    ops = parse_list(args.only, str, 'case') if args.only else list(MAIN_OPS) + list(REFERENCE_OPS)
    expanded = []
    for op in ops:
        expanded += OP_ALIASES.get(op, (op, ))
    unknown = [op for op in expanded if op not in MAIN_OPS + REFERENCE_OPS]
    if unknown:
        parser.error(f'--only: unknown case(s) {unknown} (known: {", ".join(MAIN_OPS + REFERENCE_OPS)}, train)')
    if not args.reference and any(op in REFERENCE_OPS for op in expanded) and args.only:
        parser.error(f'--only {args.only}: reference cases need --reference DIR')
    args.ops = expanded
    if args.weights is not None and not osp.isfile(args.weights):
        parser.error(f'--weights: {args.weights}: file not found')
    if args.reference:
        args.reference = check_reference_dir(args.reference)
    if args.memory_limit_gb is None:
        available = mem_available_bytes()
        args.memory_limit_bytes = int(0.75 * available) if available else None
    else:
        args.memory_limit_bytes = int(args.memory_limit_gb * 1024**3) or None
    if args.repeats < 1 or args.warmup < 0:
        parser.error('--repeats must be >= 1 and --warmup >= 0')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == 'all':
        devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    if 'cuda' in devices and not torch.cuda.is_available():
        raise SystemExit('--device cuda: CUDA is not available here')
    cases = build_cases(args, devices)
    if args.list:
        for spec in cases:
            print(spec['id'])
        return 0

    env = environment(args, devices)
    lines = []

    def out(line=''):
        print(line, flush=True)
        lines.append(line)

    out(f"VQIR benchmark - torch {env['torch']}, {args.threads} thread(s), dtype {args.dtype}, devices "
        f"{', '.join(devices)}{' (smoke: tiny network)' if args.smoke else ''}")
    out(f"CPU: {env['cpu_model']} ({env['cpu_count']} cores, {env['cpu_capability']}, flags {env['cpu_flags']})"
        + (f"; GPU: {env['gpu']}" if 'gpu' in env else ''))
    out(f"load average at start {env['load_average_start']} (1/5/15 min); "
        f"channels_last {args.channels_last}, compile {args.compile}; repeats {args.repeats}, warm-up {args.warmup}")
    out(f"malloc {args.malloc}; huge pages for large tensors {env['huge_pages']} "
        f"(kernel THP mode {env['transparent_hugepage']})")
    if args.channels_last or args.compile:
        for flag in ('channels_last', 'compile'):
            if getattr(args, flag):
                out(f'  {flag}: {flag_support()[flag]}')
    out('')

    # children are forked from this process: objects that exist now are never collected in them
    # (no copy-on-write of the whole heap by their garbage collector)
    gc.collect()
    gc.freeze()
    results = []
    for i, spec in enumerate(cases):
        print(f'[{i + 1}/{len(cases)}] {spec["id"]} ...', end=' ', flush=True)
        result = run_case(spec, args.case_timeout)
        results.append({'spec': spec, 'result': result})
        summary = result.get('status')
        if summary == 'ok' and result.get('median_s') is not None:
            summary = f"{result['median_s']:.3f} s"
        elif summary == 'ok' and spec['op'] == 'conv':
            summary = f"{result['conv_gflop_per_s']:.1f} GFLOP/s"
        elif summary != 'ok':
            summary = f"{summary}: {result.get('error', '')}"
        print(f"{summary} ({result['case_wall_s']:.0f} s, load {result.get('load_after')})", flush=True)

    out('')
    for row in results:
        if row['spec']['op'] == 'conv' and row['result'].get('status') == 'ok':
            probe = SMOKE_CONV_PROBE_SIZE if args.smoke else CONV_PROBE['size']
            out(f"{row['spec']['device']}: plain 128-channel 3x3 conv ({probe}x{probe}, batch 1): "
                f"{row['result']['conv_gflop_per_s']:.1f} GFLOP/s")
    print_main_table(results, out)
    print_precision_table(results, out)
    print_reference_tables(results, out)
    print_targets(evaluate_targets(results), out)
    env['load_average_end'] = load_average()
    out('')
    out(f"load average at end {env['load_average_end']}")

    support = flag_support()
    if args.json:
        outputs = {args.json: results}
    else:
        outputs = {default_json_path(d): [r for r in results if r['spec']['device'] == d] for d in devices}
    for path, device_results in outputs.items():
        payload = OrderedDict(environment=env, flag_support=support, targets=TARGETS,
                              target_checks=evaluate_targets(device_results), cases=device_results, table=lines)
        write_json(path, payload)
        print(f'results written to {path}')
    return 0 if all(r['result'].get('status') in ('ok', 'skipped') for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
