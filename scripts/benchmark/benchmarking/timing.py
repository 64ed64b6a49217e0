"""Timing: wall and process CPU seconds of repeated runs after warm-up runs (the first of which
counts FLOPs), alone or in turns with other runs so that all see the same load."""
import resource
import statistics
import time

import torch

from benchmarking.flops import count_flops
from benchmarking.networks import eager


def median(values):
    return statistics.median(values) if values else None


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


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
