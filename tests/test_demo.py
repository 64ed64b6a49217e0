"""The demo cannot silently break: a shortened `make demo` (a few iterations per stage) end to end."""
import csv
import os
import subprocess
import sys
from os import path as osp

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_quick_demo_runs_all_stages_and_writes_the_report(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'scripts', 'demo.py'), '--quick', '--root', str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name in ('demo_stage0_vqgan', 'demo_stage1_ifrm_x16', 'demo_stage2_msrm_x16'):
        assert osp.isfile(tmp_path / 'experiments' / name / 'models' / 'net_g_latest.pth'), name
        with open(tmp_path / 'experiments' / name / 'train_log.csv', newline='') as f:
            assert len(list(csv.DictReader(f))) == 4  # print_freq 1, 4 iterations

    results = tmp_path / 'results' / 'demo'
    photos = sorted(osp.splitext(p)[0] for p in os.listdir(osp.join(ROOT, 'datasets', 'demo', 'val')))
    assert len(photos) == 3
    for folder in ('LR', 'Level_1', 'Level_2', 'Level_4'):
        assert sorted(osp.splitext(p)[0] for p in os.listdir(results / 'demo_val' / folder)) == photos
    assert sorted(osp.splitext(p)[0] for p in os.listdir(results / 'figures')) == photos
    assert len(os.listdir(results / 'curves')) == 3
    with open(results / 'comparison.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['image'] for r in rows] == photos + ['mean']
    for r in rows:  # every figure is a finite number measured from the saved images
        for key in ('bicubic_psnr', 'vqir_psnr', 'vqir_lr_psnr'):
            assert 0 < float(r[key]) < 100, (key, r)
    table = (results / 'comparison.md').read_text()
    assert 'bicubic x16 PSNR' in table and 'not the paper' in table
    assert f'Results in {results}' in proc.stdout
