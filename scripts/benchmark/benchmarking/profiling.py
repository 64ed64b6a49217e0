"""Where the time goes: per-operator times of one profiled run (torch.profiler), the share of
convolutions and matrix products in them, and the speed-up those kernels allow."""
from benchmarking.timing import sync


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
