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
vqir's entry points ask PyTorch to (``vqir.utils.allocator.use_huge_pages``), except with
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

    python scripts/benchmark/benchmark.py --quick --device cpu --threads 2
    python scripts/benchmark/benchmark.py --quick --reference /tmp/vqir_ref --only ref_forward,ref_train,ref_memory
    python scripts/benchmark/benchmark.py --sizes 2040x1356 --scales 16 --only roundtrip --repeats 1
    python scripts/benchmark/benchmark.py --device cuda --only precision --weights pretrained/vqir_x16.pth --scales 16
    python scripts/benchmark/benchmark.py --list            # case ids, for --skip 'cpu/x32/*'
    python scripts/benchmark/benchmark.py --smoke --json /tmp/smoke.json   # tiny network, seconds
"""
import argparse
import gc
import os
import re
import sys
from collections import OrderedDict
from os import path as osp

HERE = osp.dirname(osp.abspath(__file__))
if HERE not in sys.path:  # the benchmarking/ modules beside this file
    sys.path.insert(0, HERE)
from benchmarking import ROOT  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# '--malloc default' also leaves PyTorch's page size alone, which must be decided before torch's
# first allocation (vqir.utils.allocator); the children inherit it
if re.search(r'(^|\s)--malloc[= ]default(\s|$)', ' '.join(sys.argv[1:])):
    os.environ['VQIR_MALLOC'] = 'default'

import torch  # noqa: E402

import vqir  # noqa: E402,F401  (registers the architectures and losses)
from vqir.inference import DEFAULT_TILE_OVERLAP  # noqa: E402
from vqir.utils.allocator import use_huge_pages  # noqa: E402

from benchmarking.case_list import MAIN_OPS, MEMORY_VARIANTS, OP_ALIASES, REFERENCE_OPS, build_cases  # noqa: E402
from benchmarking.child_process import run_case  # noqa: E402
from benchmarking.conv_yardstick import CONV_PROBE, SMOKE_CONV_PROBE_SIZE  # noqa: E402
from benchmarking.machine import environment, load_average, mem_available_bytes  # noqa: E402
from benchmarking.networks import flag_support  # noqa: E402
from benchmarking.reference import check_reference_dir  # noqa: E402
from benchmarking.report import (default_json_path, print_main_table, print_precision_table,  # noqa: E402
                                 print_reference_tables, write_json)
from benchmarking.sizes import parse_size  # noqa: E402
from benchmarking.targets import TARGETS, evaluate_targets, print_targets  # noqa: E402

DEFAULT_SIZES = '256,512,1024,2040x1356'
QUICK_SIZES = '256,512'
SMOKE_SIZES = '96x64'
DEFAULT_MEMORY_SIZE = '2040x1356'


def parse_list(text, convert=str, what='value'):
    items = [t.strip() for t in text.split(',') if t.strip()]
    try:
        return [convert(t) for t in items]
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise argparse.ArgumentTypeError(f'{what} list {text!r}: {err}') from None


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
    use_huge_pages()  # before the first tensor (PyTorch reads the setting once); the children inherit it
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
