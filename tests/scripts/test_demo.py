"""The demo cannot silently break: a shortened `make demo` (a few iterations per stage) end to end."""
import csv
import importlib.util
import os
import subprocess
import sys
from os import path as osp

import cv2
import numpy as np

from helpers import ROOT
PHOTO_COLUMNS = ('y_psnr', 'ssim', 'rgb_psnr', 'ciede2000')


def load_demo_script(name):
    scripts = osp.join(ROOT, 'scripts', 'demo')
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    spec = importlib.util.spec_from_file_location(name, osp.join(scripts, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_demo_runs_stages_from_the_pretrained_prior_and_writes_the_report(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'scripts', 'demo', 'demo.py'), '--quick', '--root',
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert not osp.exists(tmp_path / 'experiments' / 'demo_stage0_vqgan')  # the committed prior is used
    assert 'pretrained/demo_vqgan_f16.safetensors: VQGAN prior loaded' in proc.stdout + proc.stderr
    for name in ('demo_stage1_ifrm_x16', 'demo_stage2_msrm_x16'):
        assert osp.isfile(tmp_path / 'experiments' / name / 'models' / 'net_g_latest.pth'), name
        with open(tmp_path / 'experiments' / name / 'train_log.csv', newline='') as f:
            assert len(list(csv.DictReader(f))) == 4  # print_freq 1, 4 iterations
    # stage 2 keeps the state that validated best on the select photos (iteration 0 or 4); the test uses it
    assert osp.isfile(tmp_path / 'experiments' / 'demo_stage2_msrm_x16' / 'models' / 'net_g_best.pth')

    results = tmp_path / 'results' / 'demo'
    photos = sorted(osp.splitext(p)[0] for p in os.listdir(osp.join(ROOT, 'datasets', 'demo', 'val')))
    assert photos == ['chelsea', 'coffee', 'colorwheel', 'motorcycle_right']
    for folder in ('LR', 'Level_1', 'Level_2', 'Level_4'):
        assert sorted(osp.splitext(p)[0] for p in os.listdir(results / 'demo_val' / folder)) == photos
    assert sorted(osp.splitext(p)[0] for p in os.listdir(results / 'figures')) == photos
    figure = cv2.imread(str(results / 'figures' / 'chelsea.png'))
    assert figure is not None and figure.shape[1] > 3 * figure.shape[0]  # six panels side by side
    assert len(os.listdir(results / 'curves')) == 2

    with open(results / 'comparison.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    methods = ['bicubic', 'VQGAN alone', 'stage 1', 'VQIR']
    natural = [p for p in photos if p != 'colorwheel']
    expected = [(p, m) for p in natural + ['mean'] for m in methods] + [('colorwheel (chart)', m) for m in methods]
    assert [(r['image'], r['method']) for r in rows] == expected
    for r in rows:  # every figure is a finite number measured from the saved images
        for key in PHOTO_COLUMNS:
            assert 0 <= float(r[key]) < 100, (key, r)
        lr_columns = [float(r[key]) for key in ('lr_rgb_psnr', 'lr_ciede2000') if r[key]]
        # the LRs of stage 1 and VQIR, and on the VQGAN row its reconstruction downscaled
        assert len(lr_columns) == (2 if r['method'] in ('VQGAN alone', 'stage 1', 'VQIR') else 0), r
    chelsea = {r['method']: r for r in rows if r['image'] == 'chelsea'}
    assert 15 < float(chelsea['bicubic']['y_psnr']) < 35 and float(chelsea['bicubic']['ciede2000']) < 10
    # the committed prior reconstructs a photo it never saw in its colours, before any training here
    assert float(chelsea['VQGAN alone']['ciede2000']) < 2 * float(chelsea['bicubic']['ciede2000'])
    table = (results / 'comparison.md').read_text()
    assert 'CIEDE2000' in table and 'not the paper' in table and 'Targets:' in table
    assert 'VQIR is stage 2 at iteration ' in table and 'on demo_select' in table
    assert f'Results in {results}' in proc.stdout


def test_train_prior_flag_trains_stage0_and_hands_it_to_stage1(monkeypatch, tmp_path):
    demo = load_demo_script('demo')
    commands = []
    monkeypatch.setattr(demo, 'run', lambda cmd, root: commands.append(cmd))
    demo.train_all(str(tmp_path), quick=True, train_prior=True, seed=3)
    assert [cmd[2] for cmd in commands] == [demo.PRIOR_STAGE[1]] + [opt for _, opt, _ in demo.STAGES]
    stage1 = commands[1]
    assert f'path:pretrain_network_vqgan={demo.TRAINED_PRIOR}' in stage1 and 'manual_seed=3' in stage1
    assert not any(arg.startswith('manual_seed') for arg in commands[0])  # the prior keeps its own seed

    commands.clear()
    demo.train_all(str(tmp_path), quick=False, train_prior=False, seed=None)
    assert [cmd[2] for cmd in commands] == [opt for _, opt, _ in demo.STAGES]
    assert not any('pretrain_network_vqgan' in arg for cmd in commands for arg in cmd)


def test_report_measures_colour_that_y_psnr_cannot_see():
    report = load_demo_script('demo_report')
    rng = np.random.default_rng(0)
    hr = rng.integers(60, 200, size=(64, 64, 3), dtype=np.uint8)
    swapped = hr[..., ::-1].copy()  # red and blue exchanged
    grey = np.repeat(cv2.cvtColor(hr, cv2.COLOR_BGR2GRAY)[..., None], 3, axis=2)
    same = report.measure(hr, hr, border=4)
    assert same['ciede2000'] == 0 and np.isinf(same['rgb_psnr'])
    for wrong in (swapped, grey):
        m = report.measure(wrong, hr, border=4)
        assert m['ciede2000'] > 5 and m['rgb_psnr'] < m['y_psnr']


def test_report_targets_read_the_means():
    report = load_demo_script('demo_report')
    base = dict(y_psnr=20.0, ssim=0.5, rgb_psnr=18.0, ciede2000=10.0)
    means = {'bicubic': base, 'vqgan': base, 'stage1': dict(base, y_psnr=19.0),
             'vqir': dict(base, y_psnr=19.2, ciede2000=12.0, lr_rgb_psnr=27.0)}
    assert [met for _, _, met in report.targets(means)] == [True, True, True, True]
    means['vqir'] = dict(means['vqir'], ciede2000=14.0, y_psnr=18.7, lr_rgb_psnr=25.0)
    assert [met for _, _, met in report.targets(means)] == [False, True, False, False]


def test_report_names_the_stage2_state_that_keep_best_kept(tmp_path):
    report = load_demo_script('demo_report')
    keep_best = {'dataset': 'demo_select', 'metric': 'psnr_level1'}
    vis = tmp_path / 'visualization'
    vis.mkdir()
    assert report.kept_state(str(tmp_path), keep_best) is None  # no validation yet: no line
    for it, value in ((0, 25.0), (300, 25.2), (600, 25.2)):
        (vis / f'metrics_demo_select_{it}.csv').write_text(
            f'image,psnr_level1\ncamera,{value - 1}\nmean,{value}\n', encoding='utf-8')
    (vis / 'metrics_demo_val_300.csv').write_text('image,psnr_level1\nmean,30.0\n', encoding='utf-8')  # another set
    assert report.kept_state(str(tmp_path), keep_best) == (300, {0: 25.0, 300: 25.2, 600: 25.2})  # earliest of ties
    line = report.kept_state_line(str(tmp_path), keep_best)
    assert line.startswith('VQIR is stage 2 at iteration 300: ') and '0: 25.00, 300: 25.20, 600: 25.20' in line
    (vis / 'metrics_demo_select_300.csv').write_text('image,psnr_level1\nmean,24.0\n', encoding='utf-8')
    (vis / 'metrics_demo_select_600.csv').write_text('image,psnr_level1\nmean,24.5\n', encoding='utf-8')
    assert 'iteration 0 (the untrained MSRM' in report.kept_state_line(str(tmp_path), keep_best)
    assert report.kept_state(str(tmp_path), dict(keep_best, better='lower'))[0] == 300  # e.g. a colour error
