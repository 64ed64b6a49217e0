#!/usr/bin/env python
"""Time and peak memory of VQIR inference on one large image, whole and in tiles.

The released network configuration (stage 2, ch 128, ch_mult [1, 1, 2, 2, 4], attn_mult [3, 3])
with random weights (speed and memory do not depend on the values), through
``vqir.inference.Rescaler``, on the CPU by default. Every (mode, direction) runs in its own
child process, so that each peak is its own: the child reports its wall time, CPU time and the
peak resident set size (``ru_maxrss``) of the whole process, which includes Python, torch and
the network (about 1.2 GB before any image is processed; reported separately as ``base``).

Modes: ``whole`` (tile=0), ``auto`` (the Rescaler's default: tiles above 2048x1024 pixels) and
``tile<N>`` (tile cores of N HR pixels). Directions: ``down`` (HR -> 8-bit LR) and ``up``
(LR -> reconstructions; a random 8-bit LR of the right size, since the values do not matter).

A child whose resident memory passes ``--max-gb`` (default 20) is stopped and reported as
such, so the machine never runs out of memory.

    python scripts/benchmark/benchmark_tiling.py                          # 2040x1356, whole / auto / tile512
    python scripts/benchmark/benchmark_tiling.py --size 1020x678 --modes whole auto --threads 2
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from os import path as osp

HERE = osp.dirname(osp.abspath(__file__))
if HERE not in sys.path:  # the benchmarking/ modules beside this file
    sys.path.insert(0, HERE)
from benchmarking import ROOT  # noqa: E402
from benchmarking.memory import max_resident_bytes, resident_bytes  # noqa: E402
from benchmarking.sizes import parse_size, size_name  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def tile_of(mode):
    return {'whole': 0, 'auto': None}.get(mode, int(mode[4:]) if mode.startswith('tile') else None)


def child(args):
    """Run one (mode, direction) and print one JSON line."""
    import torch

    import vqir  # noqa: F401  (registers the architectures)
    from basicsr.utils.registry import ARCH_REGISTRY
    from vqir.inference import Rescaler, official_network_options
    from vqir.utils.allocator import use_huge_pages

    use_huge_pages()  # as vqir-rescale: before the first tensor (PyTorch reads the setting once)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    opt = official_network_options(args.scale)
    opt.pop('type')
    net = ARCH_REGISTRY.get('VQIR')(**opt).eval()
    rescaler = Rescaler(net, device=args.device, tile=tile_of(args.mode), tile_overlap=args.tile_overlap)
    height, width = args.size
    lr_h, lr_w = -(-height // args.scale), -(-width // args.scale)
    if args.direction == 'down':
        image = torch.rand(1, 3, height, width)
        run = lambda: rescaler.downscale(image)  # noqa: E731
    else:
        image = torch.randint(0, 256, (1, 3, lr_h, lr_w)).float() / 255.
        run = lambda: rescaler.upscale(image, out_size=(height, width))  # noqa: E731
    base = max_resident_bytes()
    tiles = len(rescaler._tiles(*rescaler.network_size(height, width)))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = run()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    shapes = [list(result.shape)] if torch.is_tensor(result) else {k: list(v.shape) for k, v in result.items()}
    peak = max_resident_bytes()
    print(json.dumps(dict(mode=args.mode, direction=args.direction, tiles=tiles, seconds=wall, cpu_seconds=cpu,
                          base_bytes=base, peak_bytes=peak, shapes=shapes)), flush=True)


def run_child(args, mode, direction):
    cmd = [sys.executable, osp.abspath(__file__), '--child', '--mode', mode, '--direction', direction,
           '--size', size_name(args.size), '--scale', str(args.scale), '--threads', str(args.threads),
           '--tile-overlap', str(args.tile_overlap), '--device', args.device]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    limit = args.max_gb * 1024**3
    stopped = threading.Event()

    def watch():
        while proc.poll() is None:
            if (resident_bytes(proc.pid) or 0) > limit:
                stopped.set()
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if stopped.is_set():
        return dict(mode=mode, direction=direction, skipped=f'stopped above {args.max_gb} GB resident memory')
    if proc.returncode != 0:
        return dict(mode=mode, direction=direction, failed=(err.strip().splitlines() or ['?'])[-1])
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=parse_size, default=(1356, 2040), help='WxH of the HR image (2040x1356)')
    parser.add_argument('--scale', type=int, choices=(16, 32), default=16)
    parser.add_argument('--modes', nargs='+', default=['whole', 'auto', 'tile512'])
    parser.add_argument('--directions', nargs='+', choices=('down', 'up'), default=['down', 'up'])
    parser.add_argument('--tile-overlap', type=int, default=128)
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--max-gb', type=float, default=20.)
    parser.add_argument('--json', help='also write the results to this file')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--mode', help=argparse.SUPPRESS)
    parser.add_argument('--direction', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    print(f'VQIR {args.scale}x, released configuration, random weights; {size_name(args.size)} image; '
          f'{args.device}, {args.threads} threads; tile_overlap {args.tile_overlap}', flush=True)
    print(f"{'mode':10s} {'direction':9s} {'tiles':>5s} {'seconds':>8s} {'CPU s':>8s} {'base GB':>8s} {'peak GB':>8s}",
          flush=True)
    results = []
    for mode in args.modes:
        for direction in args.directions:
            r = run_child(args, mode, direction)
            results.append(r)
            if 'skipped' in r or 'failed' in r:
                print(f"{mode:10s} {direction:9s} {r.get('skipped') or 'failed: ' + r['failed']}", flush=True)
                continue
            print(f"{mode:10s} {direction:9s} {r['tiles']:5d} {r['seconds']:8.1f} {r['cpu_seconds']:8.1f} "
                  f"{r['base_bytes'] / 1e9:8.2f} {r['peak_bytes'] / 1e9:8.2f}", flush=True)
    if args.json:
        from vqir.utils.atomic_file import atomic_write_bytes  # here: the parent process measures no network
        height, width = args.size
        payload = dict(size=(width, height), scale=args.scale, threads=args.threads, device=args.device,
                       tile_overlap=args.tile_overlap, results=results)
        atomic_write_bytes(args.json, json.dumps(payload, indent=1).encode('utf-8'))


if __name__ == '__main__':
    sys.exit(main())
