"""The benchmark's report: the tables it prints, and the JSON file it writes."""
import json
from os import path as osp

from vqir.utils.atomic_file import atomic_write_bytes

from benchmarking import ROOT
from benchmarking.case_list import MAIN_OPS
from benchmarking.memory import gb


def fmt(value, spec='.2f', missing='-'):
    if value is None:
        return missing
    return format(value, spec)


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


def default_json_path(device_label):
    return osp.join(ROOT, 'results', 'benchmark', f'benchmark_{device_label}.json')


def write_json(path, payload):
    atomic_write_bytes(path, json.dumps(payload, indent=1, default=str).encode('utf-8'))
