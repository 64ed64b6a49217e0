"""FLOPs of one run, counted by ``torch.utils.flop_counter`` (2 per multiply-add), in total, in
convolutions, per operator and per top-level part of the network."""
import torch


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
