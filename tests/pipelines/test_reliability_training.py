"""Training that survives crashes and notices trouble.

- A training process killed with SIGKILL at random moments, also in the middle of writing a
  checkpoint, leaves only complete checkpoints and training states (at most hidden temporary
  files, which resume ignores and removes), and ``--auto_resume`` finishes the run.
- A training state written on a GPU resumes on a CPU-only machine.
- Non-finite losses skip their step (weights and optimiser untouched, the loss named in the
  log); ``train.max_bad_steps`` consecutive bad steps stop the run with one clear error line,
  keeping the checkpoints; good steps in between reset the count.

(A resumed run following the uninterrupted one: test_resume.py; the model's gradient checks and
clipping: tests/models/test_base_model.py.)

The stage-0 runs use the tiny config with a smaller network still (``ch_mult`` of ones, 32-pixel
crops), so that each iteration takes a fraction of a second on a CPU.
"""
import glob
import json
import os
import random
import re
import subprocess
import sys
from os import path as osp
from unittest import mock

import pytest
import torch

from vqir.models.vqgan_model import VQGANModel
from vqir.train_pipeline import main as train_main
from vqir.train_pipeline import train_pipeline
from vqir.utils.checkpoint import load_checkpoint, load_state_dict

from helpers import ROOT, read_csv

STAGE0_YML = osp.join(ROOT, 'options', 'train', 'stage0_vqgan_tiny.yml')
STAGE0 = 'stage0_vqgan_tiny'
# What an interrupted atomic write leaves: '.<target name>.<random>.tmp' beside the target.
TEMP_FILE = re.compile(r'^\.(net_[a-z]+_(\d+|latest)\.pth|\d+\.state)\.[^.]+\.tmp$')


def stage0_argv(demo, *force, extra=()):
    """The tiny stage-0 config, smaller still, no validation, every iteration logged."""
    return ['-opt', STAGE0_YML, *extra, '--force_yml', f'datasets:train:dataroot_gt={demo}/train',
            f'datasets:val:dataroot_gt={demo}/val', 'datasets:train:gt_size=32', 'datasets:train:batch_size_per_gpu=2',
            'network_g:ch_mult=[1,1,1,1,1]', 'network_d:ndf=8', 'val=~', 'logger:pbar=false', 'logger:print_freq=1',
            *force]


def read_log(exp):
    texts = []
    for path in sorted(glob.glob(osp.join(exp, 'train_*.log'))):
        with open(path, encoding='utf-8') as f:
            texts.append(f.read())
    return '\n'.join(texts)


def newest_state(exp):
    folder = osp.join(exp, 'training_states')
    return max((int(n[:-len('.state')]) for n in os.listdir(folder) if re.fullmatch(r'\d+\.state', n)), default=0)


def check_checkpoint_folders(exp):
    """Every checkpoint and training state present loads; returns the temporary files left beside them."""
    temps = []
    for sub in ('models', 'training_states'):
        for name in sorted(os.listdir(osp.join(exp, sub))):
            path = osp.join(exp, sub, name)
            if name.startswith('.'):
                assert TEMP_FILE.match(name), f'unexpected hidden file {path}'
                temps.append(name)
            elif sub == 'models':
                assert re.fullmatch(r'net_[gd]_(\d+|latest)\.pth', name), path
                assert load_state_dict(path, param_key='params'), path
            else:
                state = load_checkpoint(path)
                assert state['iter'] == int(name[:-len('.state')]) and len(state['optimizers']) == 2, path
    return temps


# ---------------------------------------------------------------------------------------------- SIGKILL

# A process that trains through the real pipeline in forked children (vqir is imported once),
# kills each child with SIGKILL as told on stdin, and reports on stdout. Checkpoint writes are
# slowed (the bytes go out in 8 pieces, 10 ms apart) so that a kill can land inside one.
KILL_DRIVER = r'''
import io, json, os, re, signal, sys, time
import torch
import vqir  # noqa: F401
from vqir.train_pipeline import train_pipeline

root, argv, exp = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]


def slow_save(obj, f, *args, _save=torch.save, **kwargs):
    buffer = io.BytesIO()
    _save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    step = max(1, len(data) // 8)
    for start in range(0, len(data), step):
        f.write(data[start:start + step])
        f.flush()
        time.sleep(0.01)


def newest_state():
    folder = os.path.join(exp, 'training_states')
    if not os.path.isdir(folder):
        return 0
    return max((int(n[:-6]) for n in os.listdir(folder) if re.fullmatch(r'\d+\.state', n)), default=0)


def temp_files():
    return [n for sub in ('models', 'training_states') if os.path.isdir(os.path.join(exp, sub))
            for n in os.listdir(os.path.join(exp, sub)) if n.endswith('.tmp')]


for line in sys.stdin:
    command = json.loads(line)
    start = newest_state()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout is the report channel
        torch.set_num_threads(1)
        torch.save = slow_save
        try:
            train_pipeline(root, argv)
        finally:
            os._exit(0)
    deadline = time.time() + 120
    while newest_state() <= start:  # a new checkpoint first, so that every run makes progress
        if os.waitpid(pid, os.WNOHANG)[0] or time.time() > deadline:
            print(json.dumps({'error': 'the training run ended before it was killed'}), flush=True)
            sys.exit(1)
        time.sleep(0.002)
    if command['kill'] == 'during_save':
        while not [n for n in temp_files() if n not in command['known_temps']]:
            time.sleep(0.001)
    else:
        time.sleep(command['delay'])
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print(json.dumps({'resumed_from': start, 'newest_state': newest_state(), 'temps': temp_files()}), flush=True)
'''


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='the driver forks its training runs')
def test_sigkill_at_random_moments_leaves_loadable_checkpoints_and_auto_resume_finishes(tmp_path, demo):
    root = str(tmp_path / 'root')
    exp = osp.join(root, 'experiments', STAGE0)
    argv = stage0_argv(demo, 'train:total_iter=1000', 'logger:save_checkpoint_freq=1',
                       'train:vqgan_loss_opt:disc_start=3', extra=['--auto_resume'])
    driver = tmp_path / 'kill_driver.py'
    driver.write_text(KILL_DRIVER, encoding='utf-8')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    rng = random.Random(0)
    plan = [{'kill': 'during_save'}, {'kill': 'after', 'delay': rng.uniform(0, 0.3)}, {'kill': 'during_save'},
            {'kill': 'after', 'delay': rng.uniform(0.3, 1.0)}, {'kill': 'during_save'}]
    reports = []
    with open(tmp_path / 'driver.log', 'w') as log, subprocess.Popen(
            [sys.executable, str(driver), root, json.dumps(argv), exp], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log, text=True, env=env, cwd=tmp_path) as proc:
        try:
            known_temps = []
            for command in plan:
                proc.stdin.write(json.dumps(dict(command, known_temps=known_temps)) + '\n')
                proc.stdin.flush()
                line = proc.stdout.readline()
                assert line, (tmp_path / 'driver.log').read_text()
                report = json.loads(line)
                assert 'error' not in report, report
                reports.append(report)
                # right after the kill: everything present loads, the rest is hidden temporaries
                known_temps = check_checkpoint_folders(exp)
                assert sorted(known_temps) == sorted(report['temps'])
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    killed_in_save = [r for r, c in zip(reports, plan) if c['kill'] == 'during_save']
    assert all(r['temps'] for r in killed_in_save)  # these kills did land inside a checkpoint write
    assert all(b['resumed_from'] == a['newest_state'] for a, b in zip(reports, reports[1:]))  # each run resumed
    temps_before = check_checkpoint_folders(exp)
    assert temps_before

    # the interrupted writes' temporaries do not disturb --auto_resume, which finishes the run
    last = newest_state(exp)
    total = last + 2
    model = train_pipeline(root, argv=stage0_argv(demo, f'train:total_iter={total}', 'logger:save_checkpoint_freq=1',
                                                  'train:vqgan_loss_opt:disc_start=3', extra=['--auto_resume']))
    assert model.opt['path']['resume_state'] == osp.join(exp, 'training_states', f'{last}.state')
    assert check_checkpoint_folders(exp) == []  # and are removed by it
    assert newest_state(exp) == total
    assert load_state_dict(osp.join(exp, 'models', 'net_g_latest.pth'))
    # the loss log holds each iteration once, although killed runs logged iterations they never saved
    assert [int(r['iter']) for r in read_csv(osp.join(exp, 'train_log.csv'))] == list(range(1, total + 1))
    print(f'{len(plan)} kills ({len(killed_in_save)} inside a checkpoint write); temporaries left: '
          f'{len(temps_before)}; resumed at {last}, finished at {total}')


# ---------------------------------------------------------------------------------------------- GPU state on CPU


def _save_as_if_on_cuda(obj, path):
    """torch.save with every storage recorded as living on cuda:0 (what a GPU run writes)."""
    with mock.patch.object(torch.serialization, 'location_tag', lambda storage: 'cuda:0'):
        torch.save(obj, path)


def test_state_saved_on_a_gpu_resumes_on_a_cpu(tmp_path, demo):
    root = str(tmp_path)
    exp = osp.join(root, 'experiments', STAGE0)
    common = ['logger:save_checkpoint_freq=2', 'train:vqgan_loss_opt:disc_start=2']
    train_pipeline(root, argv=stage0_argv(demo, 'train:total_iter=2', *common))
    state_path = osp.join(exp, 'training_states', '2.state')
    state = torch.load(state_path, weights_only=True)
    state['rng']['cuda'] = [torch.get_rng_state()]  # as torch.cuda.get_rng_state_all() of one GPU
    _save_as_if_on_cuda(state, state_path)
    for label in ('net_g', 'net_d'):
        path = osp.join(exp, 'models', f'{label}_2.pth')
        _save_as_if_on_cuda(torch.load(path, weights_only=True), path)
    with pytest.raises(RuntimeError, match='deserialize object on a CUDA device'):
        torch.load(state_path, weights_only=True)  # the files really name a GPU

    model = train_pipeline(root, argv=stage0_argv(demo, 'train:total_iter=4', *common, extra=['--auto_resume']))
    assert model.opt['path']['resume_state'] == state_path
    assert [int(r['iter']) for r in read_csv(osp.join(exp, 'train_log.csv'))] == [1, 2, 3, 4]
    for optimizer in model.optimizers:
        for param_state in optimizer.state.values():
            assert all(v.device.type == 'cpu' for v in param_state.values() if torch.is_tensor(v))


# ---------------------------------------------------------------------------------------------- non-finite steps


@pytest.fixture
def poisoned_iterations(monkeypatch):
    """Iterations (a set to fill) whose batch is replaced by NaNs before the stage-0 step."""
    poisoned = set()
    original = VQGANModel.optimize_parameters

    def optimize_parameters(self, current_iter):
        if current_iter in poisoned:
            self.gt = torch.full_like(self.gt, float('nan'))
        return original(self, current_iter)

    monkeypatch.setattr(VQGANModel, 'optimize_parameters', optimize_parameters)
    return poisoned


def test_bad_steps_are_skipped_and_good_steps_reset_the_count(tmp_path, demo, poisoned_iterations):
    poisoned_iterations.update({2, 3, 5, 6})
    root = str(tmp_path)
    exp = osp.join(root, 'experiments', STAGE0)
    train_pipeline(root, argv=stage0_argv(demo, 'train:total_iter=7', 'train:max_bad_steps=3',
                                          'logger:save_checkpoint_freq=1', 'train:vqgan_loss_opt:disc_start=100'))
    assert osp.isfile(osp.join(exp, 'models', 'net_g_latest.pth'))  # two in a row never reached the limit of 3
    log = read_log(exp)
    warnings = re.findall(r'non-finite loss (.*): step skipped \((\d) in a row, limit 3\)', log)
    assert [count for _, count in warnings] == ['1', '2', '1', '2']
    assert all('l_rec' in names for names, _ in warnings)

    weights = {it: load_state_dict(osp.join(exp, 'models', f'net_g_{it}.pth')) for it in range(1, 8)}
    states = {it: load_checkpoint(osp.join(exp, 'training_states', f'{it}.state')) for it in range(1, 8)}

    def same_weights(a, b):
        return all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])

    def adam_steps(it):
        return {float(s['step']) for s in states[it]['optimizers'][0]['state'].values()}

    # a skipped step changes neither the weights nor the optimiser; a good one does
    assert same_weights(1, 2) and same_weights(1, 3) and same_weights(4, 5) and same_weights(4, 6)
    assert not same_weights(3, 4) and not same_weights(6, 7)
    assert [adam_steps(it) for it in range(1, 8)] == [{1.}, {1.}, {1.}, {2.}, {2.}, {2.}, {3.}]
    # skipped steps log no losses: the curve has a gap, not the previous step's values
    assert [int(r['iter']) for r in read_csv(osp.join(exp, 'train_log.csv'))] == [1, 4, 7]


def test_consecutive_bad_steps_stop_the_run_and_keep_the_checkpoints(tmp_path, demo, poisoned_iterations, capsys):
    poisoned_iterations.update(range(3, 100))
    root = str(tmp_path)
    exp = osp.join(root, 'experiments', STAGE0)
    with pytest.raises(SystemExit) as stop:
        train_main(stage0_argv(demo, f'path:root={root}', 'train:total_iter=20', 'train:max_bad_steps=3',
                               'logger:save_checkpoint_freq=1', 'train:vqgan_loss_opt:disc_start=100'))
    # a string code: Python prints it on stderr and exits with status 1
    message = stop.value.code
    assert isinstance(message, str) and '\n' not in message
    assert message.startswith('error: 3 consecutive steps with a non-finite loss l_rec')
    assert osp.join(exp, 'models') in message
    assert message[len('error: '):] in read_log(exp)

    # iterations 3 and 4 were skipped (and saved unchanged), 5 stopped the run before its save
    assert newest_state(exp) == 4
    assert sorted(os.listdir(osp.join(exp, 'models'))) == sorted(f'net_{n}_{i}.pth' for n in 'dg' for i in range(1, 5))
    last, good = (load_state_dict(osp.join(exp, 'models', f'net_g_{i}.pth')) for i in (4, 2))
    assert all(torch.equal(last[k], good[k]) and torch.isfinite(last[k]).all() for k in last)
