#!/usr/bin/env python
"""Turn the metric CSVs of several test runs into the table rescaling papers print.

    python scripts/metrics/metrics_table.py results/benchmark_x16 results/benchmark_x32 results/irn_x16 \\
        --method benchmark_x16=VQIR --method benchmark_x32=VQIR --method irn_x16=IRN -o results/table

Each argument is the results folder of one ``vqir/test.py`` run: its ``options.yml`` (the options
as the run resolved them) says the scale (``network_g: ir_scale``) and what each metric column is,
and each ``metrics_<test set>.csv`` gives a row from its mean. One row per method x test set x
scale; columns PSNR and SSIM (on Y), LPIPS, DISTS, FID and, where any run measured it, KID, each
taken from the ``val.metrics`` entry of that type that compares the full-size reconstruction
with ``gt`` (PSNR / SSIM: the one on Y where there are both). A run that did not measure a column
leaves it empty. Writes ``<out>.md`` and ``<out>.csv`` (atomically) and prints the Markdown.
"""
import argparse
import csv
import glob
import io
import re
import sys
from os import path as osp

import yaml

import vqir  # noqa: F401  (must precede basicsr: it installs the torchvision shim basicsr needs)
from vqir.utils.atomic_file import atomic_write_bytes
from vqir.utils.errors import InputError

# (column, metric type, better, decimals in Markdown)
COLUMNS = (('PSNR', 'calculate_psnr', 'higher', 2), ('SSIM', 'calculate_ssim', 'higher', 4),
           ('LPIPS', 'calculate_lpips', 'lower', 4), ('DISTS', 'calculate_dists', 'lower', 4),
           ('FID', 'calculate_fid', 'lower', 2), ('KID', 'calculate_kid', 'lower', 4))


class TableInputError(InputError):
    """A results folder cannot be read as a test run."""


def metric_columns(metrics):
    """{table column: CSV column} for one run's ``val.metrics``: entries comparing a full-size
    output with ``gt``; for PSNR / SSIM the Y-channel entry wins over an RGB one."""
    chosen = {}
    for name, opt in (metrics or {}).items():
        if not isinstance(opt, dict) or opt.get('target') != 'gt':
            continue
        for column, metric_type, _, _ in COLUMNS:
            if opt.get('type') != metric_type:
                continue
            rank = 1 if opt.get('test_y_channel') else 0
            if column not in chosen or rank > chosen[column][0]:
                chosen[column] = (rank, name)
    return {column: name for column, (_, name) in chosen.items()}


def read_run(folder, method=None):
    """[(method, test set, scale, {column: value})] of one results folder."""
    options_file = osp.join(folder, 'options.yml')
    if not osp.isfile(options_file):
        raise TableInputError(f'{folder}: no options.yml (not the results folder of a vqir/test.py run)')
    with open(options_file, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    scale = (opt.get('network_g') or {}).get('ir_scale')
    if scale is None:
        match = re.search(r'x(\d+)', opt.get('name', ''))
        scale = int(match.group(1)) if match else None
    columns = metric_columns((opt.get('val') or {}).get('metrics'))
    csv_files = sorted(glob.glob(osp.join(folder, 'metrics_*.csv')))
    if not csv_files:
        raise TableInputError(f'{folder}: no metrics_<test set>.csv')
    rows = []
    for csv_file in csv_files:
        with open(csv_file, encoding='utf-8', newline='') as f:
            records = list(csv.DictReader(f))
        mean = next((r for r in records if r.get('image') == 'mean'), None)
        if mean is None:
            raise TableInputError(f'{csv_file}: no mean row')
        values = {}
        for column, name in columns.items():
            cell = mean.get(name, '')
            if cell not in ('', None):
                values[column] = float(cell)
        test_set = osp.basename(csv_file)[len('metrics_'):-len('.csv')]
        rows.append((method or opt.get('name', osp.basename(folder)), test_set, scale, values))
    return rows


def build_table(rows):
    """(Markdown text, CSV text): rows sorted by test set, scale, then the order given."""
    order = {id(row): i for i, row in enumerate(rows)}
    rows = sorted(rows, key=lambda r: (r[1], r[2] if r[2] is not None else 0, order[id(r)]))
    used = [c for c in COLUMNS if c[0] != 'KID' or any('KID' in r[3] for r in rows)]
    arrow = {'higher': '↑', 'lower': '↓'}
    md = ['| method | test set | scale | ' + ' | '.join(f'{c} {arrow[b]}' for c, _, b, _ in used) + ' |',
          '|---|---|---|' + '---:|' * len(used)]
    table = io.StringIO(newline='')
    writer = csv.writer(table)
    writer.writerow(['method', 'test set', 'scale'] + [c for c, _, _, _ in used])
    for method, test_set, scale, values in rows:
        scale_text = f'{scale}x' if scale else ''
        cells = [f'{values[c]:.{d}f}' if c in values else '' for c, _, _, d in used]
        md.append(f'| {method} | {test_set} | {scale_text} | ' + ' | '.join(cells) + ' |')
        writer.writerow([method, test_set, scale or ''] + [repr(values[c]) if c in values else '' for c, _, _, _ in used])
    return '\n'.join(md) + '\n', table.getvalue()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help='results folders of vqir/test.py runs (results/<name>)')
    parser.add_argument('--method', action='append', default=[], metavar='RUN=LABEL',
                        help='the method name shown for a run (default: the run name); repeatable')
    parser.add_argument('-o', '--out', help='write <OUT>.md and <OUT>.csv')
    args = parser.parse_args(argv)
    args.labels = {}
    for item in args.method:
        run, sep, label = item.partition('=')
        if not sep or not run or not label:
            parser.error(f'--method expects RUN=LABEL, got {item!r}')
        args.labels[run] = label
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        rows = []
        for folder in args.runs:
            folder = folder.rstrip('/')
            rows += read_run(folder, args.labels.get(osp.basename(folder)))
    except (InputError, OSError, yaml.YAMLError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    markdown, csv_text = build_table(rows)
    print(markdown, end='')
    if args.out:
        atomic_write_bytes(f'{args.out}.md', markdown.encode('utf-8'))
        atomic_write_bytes(f'{args.out}.csv', csv_text.encode('utf-8'))
        print(f'written: {args.out}.md, {args.out}.csv', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
