"""scripts/metrics/metrics_table.py: the table of test runs' mean metrics (rows, columns, their order), and
the one error line for a folder that is not a test run's."""
import csv
import os

import yaml

from helpers import load_script


def _fake_run(folder, name, scale, metrics, means):
    """A results folder as vqir/test.py leaves it: options.yml and one CSV per test set."""
    os.makedirs(folder)
    opt = {'name': name, 'network_g': {'type': 'VQIR', 'ir_scale': scale}, 'val': {'metrics': metrics}}
    (folder / 'options.yml').write_text(yaml.safe_dump(opt))
    for test_set, values in means.items():
        columns = list(values)
        (folder / f'metrics_{test_set}.csv').write_text(
            'image,' + ','.join(columns) + '\nimg1,' + ','.join('1' for _ in columns) + '\nmean,'
            + ','.join(str(values[c]) for c in columns) + '\n')


def test_metrics_table_rows_columns_and_order(tmp_path, capsys):
    gt = dict(output='Level_1', target='gt')
    metrics = {
        'psnr_rgb': dict(type='calculate_psnr', test_y_channel=False, **gt),
        'psnr_y': dict(type='calculate_psnr', test_y_channel=True, **gt),
        'psnr_lr': dict(type='calculate_psnr', output='LR', target='lq', test_y_channel=True),
        'ssim': dict(type='calculate_ssim', test_y_channel=True, **gt),
        'lpips': dict(type='calculate_lpips', **gt), 'fid': dict(type='calculate_fid', **gt),
    }
    _fake_run(tmp_path / 'vqir_x32', 'vqir_x32', 32, metrics,
              {'DIV2K_val': dict(psnr_rgb=19.0, psnr_y=20.123, psnr_lr=40.0, ssim=0.51, lpips=0.4, fid=30.0)})
    _fake_run(tmp_path / 'vqir_x16', 'vqir_x16', 16, metrics,
              {'DIV2K_val': dict(psnr_rgb=21.0, psnr_y=22.19, psnr_lr=41.0, ssim=0.6201, lpips=0.3018, fid=16.09),
               'CLIC2020': dict(psnr_rgb=23.0, psnr_y=24.0, psnr_lr=42.0, ssim=0.7, lpips=0.2, fid=10.0)})
    table = load_script('metrics/metrics_table')
    assert table.main([str(tmp_path / 'vqir_x32'), str(tmp_path / 'vqir_x16/'), '--method', 'vqir_x16=VQIR',
                       '--method', 'vqir_x32=VQIR', '-o', str(tmp_path / 'out' / 'table')]) == 0
    markdown = (tmp_path / 'out' / 'table.md').read_text()
    assert capsys.readouterr().out == markdown
    assert markdown.splitlines() == [
        '| method | test set | scale | PSNR ↑ | SSIM ↑ | LPIPS ↓ | DISTS ↓ | FID ↓ |',
        '|---|---|---|---:|---:|---:|---:|---:|',
        '| VQIR | CLIC2020 | 16x | 24.00 | 0.7000 | 0.2000 |  | 10.00 |',
        '| VQIR | DIV2K_val | 16x | 22.19 | 0.6201 | 0.3018 |  | 16.09 |',
        '| VQIR | DIV2K_val | 32x | 20.12 | 0.5100 | 0.4000 |  | 30.00 |',
    ]
    with open(tmp_path / 'out' / 'table.csv', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    assert [(r['test set'], r['scale'], float(r['PSNR'])) for r in rows] == [
        ('CLIC2020', '16', 24.0), ('DIV2K_val', '16', 22.19), ('DIV2K_val', '32', 20.123)]
    # not a test run: one line naming the folder, exit status 1
    os.makedirs(tmp_path / 'photos')
    assert table.main([str(tmp_path / 'photos')]) == 1
    assert capsys.readouterr().err.strip() == f'error: {tmp_path / "photos"}: no options.yml (not the results folder of a vqir/test.py run)'
