"""vqir/train.py refuses checkpoints that would run code when unpickled, given as
``path:pretrain_network_g`` or found by ``--auto_resume`` (a training state or the networks beside
it): one error line naming the file, exit status 1, the code never runs and no training step runs."""
import os
import shutil
import subprocess
import sys
from os import path as osp

import pytest
import torch

from vqir.train_pipeline import main as train_main

from helpers import (ROOT, STAGE0_NAME as NAME, STAGE0_TRAIN_YML as STAGE0_YML, RunsExec, RunsFunction, RunsShell,
                     cli_env, create_marker, error_lines, run_train_main)

PAYLOADS = [RunsFunction, RunsShell, RunsExec]


def stage0_argv(demo, root, *force, extra=()):
    return ['-opt', STAGE0_YML, *extra, '--force_yml', f'path:root={root}', f'datasets:train:dataroot_gt={demo}/train',
            f'datasets:val:dataroot_gt={demo}/val', 'datasets:train:gt_size=32', 'datasets:train:batch_size_per_gpu=2',
            'network_g:ch_mult=[1,1,1,1,1]', 'network_d:ndf=8', 'val=~', 'logger:pbar=false', *force]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, demo):
    """A finished 2-iteration run (checkpoints and a training state at iteration 2), copied per test."""
    root = tmp_path_factory.mktemp('trained')
    train_main(stage0_argv(demo, root, 'train:total_iter=2', 'logger:save_checkpoint_freq=2'))
    return str(root)


def _copy_tree(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _listing(folder):
    return sorted(osp.relpath(osp.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


@pytest.mark.parametrize('payload', PAYLOADS, ids=[p.__name__ for p in PAYLOADS])
def test_malicious_pretrained_weights_are_refused(tmp_path, demo, trained, capsys, payload):
    marker = tmp_path / 'marker'
    good = torch.load(osp.join(trained, 'experiments', NAME, 'models', 'net_g_2.pth'), weights_only=True)
    evil = tmp_path / 'evil.pth'
    torch.save({'params': good['params'], 'extra': payload(marker)}, evil)
    status, err = run_train_main(stage0_argv(demo, tmp_path / 'root', 'train:total_iter=2',
                                             f'path:pretrain_network_g={evil}'), capsys)
    assert status == 1
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f'error: {evil}: refused'), err
    assert not marker.exists()
    models = tmp_path / 'root' / 'experiments' / NAME / 'models'
    assert not models.exists() or os.listdir(models) == []  # no training step ran, nothing was saved


@pytest.mark.parametrize('target', ['training_states/2.state', 'models/net_g_2.pth'])
def test_malicious_files_found_by_auto_resume_are_refused(tmp_path, demo, trained, capsys, target):
    root = _copy_tree(trained, tmp_path / 'root')
    path = osp.join(root, 'experiments', NAME, target)
    marker = tmp_path / 'marker'
    obj = torch.load(path, weights_only=True)
    obj['extra'] = RunsFunction(marker)
    torch.save(obj, path)
    status, err = run_train_main(stage0_argv(demo, root, 'train:total_iter=4', extra=['--auto_resume']), capsys)
    assert status == 1
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f'error: {path}: refused: unpickling it would call '
                                                   f'{create_marker.__module__}.create_marker'), err
    assert not marker.exists()
    assert not osp.exists(osp.join(root, 'experiments', NAME, 'training_states', '4.state'))


def test_cli_auto_resume_refuses_a_state_that_runs_a_shell_command(tmp_path, demo, trained):
    root = _copy_tree(trained, tmp_path / 'root')
    exp = osp.join(root, 'experiments', NAME)
    state_path = osp.join(exp, 'training_states', '2.state')
    marker = tmp_path / 'marker'
    state = torch.load(state_path, weights_only=True)
    state['extra'] = RunsShell(marker)
    torch.save(state, state_path)
    before = _listing(exp)
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'vqir', 'train.py'),
                           *stage0_argv(demo, root, 'train:total_iter=4', extra=['--auto_resume'])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180, env=cli_env())
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: {state_path}: refused: the file references posix.system'), \
        proc.stderr
    assert not marker.exists()
    assert _listing(exp) == before  # nothing ran: no log, no checkpoint
