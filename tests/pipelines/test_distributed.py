"""Distributed training on PyTorch's own engine: ``torchrun --nproc_per_node=2 ... --launcher pytorch``.

Two CPU processes (gloo) train the tiny stage-0 config through the real pipeline. One process
sees a NaN batch at one iteration while the other does not. What must hold:
- the run finishes (the processes skip that step together instead of waiting for each other);
- although each process trains on other batches, both hold identical parameters afterwards,
  and those are the parameters that process 0 saved;
- only process 0 writes: one log file, one loss CSV, one set of checkpoints and states.
(Multi-node launches are the same command with ``--nnodes``/``--master_addr``; see the README.)
"""
import csv
import glob
import json
import os
import signal
import socket
import subprocess
import sys
from os import path as osp

import pytest
import torch

from vqir.utils.checkpoint import load_checkpoint, load_state_dict

from helpers import ROOT
STAGE0_YML = osp.join(ROOT, 'options', 'train', 'stage0_vqgan_tiny.yml')
NAME = 'stage0_vqgan_tiny'

# One process of the run: the training pipeline as vqir/train.py runs it, with a NaN batch at the
# iterations given for its rank; afterwards it writes its parameters, buffers and the batches it saw.
RANK_DRIVER = r'''
import json, os, sys
import torch
import vqir  # noqa: F401
from vqir.models.vqgan_model import VQGANModel
from vqir.train_pipeline import train_pipeline

out, poisoned = sys.argv[1], json.loads(sys.argv[2])
rank = int(os.environ['RANK'])
torch.set_num_threads(1)
batches = {}
optimize_parameters = VQGANModel.optimize_parameters


def poisoned_optimize_parameters(self, current_iter):
    batches[current_iter] = float(self.gt.sum())
    if current_iter in poisoned.get(str(rank), []):
        self.gt = torch.full_like(self.gt, float('nan'))
    return optimize_parameters(self, current_iter)


VQGANModel.optimize_parameters = poisoned_optimize_parameters
model = train_pipeline(out, sys.argv[3:])
dump = {'parameters': {}, 'buffers': {}, 'batches': batches}
for label, net in model.saved_networks.items():
    net = model.get_bare_model(net)
    dump['parameters'].update({f'{label}.{k}': v.detach().clone() for k, v in net.named_parameters()})
    dump['buffers'].update({f'{label}.{k}': v.clone() for k, v in net.named_buffers()})
torch.save(dump, os.path.join(out, f'rank{rank}.pt'))
'''


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def kill_processes_running(script):
    """SIGKILL the processes whose command line names ``script`` (a file unique to this test)."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                arguments = f.read().split(b'\0')
        except OSError:
            continue
        if os.fsencode(script) in arguments:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def torchrun(script, script_args, nproc, timeout, cwd):
    """Run ``python -m torch.distributed.run`` (what the torchrun command runs) on this machine."""
    command = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--nnodes=1',
               '--master_addr=127.0.0.1', f'--master_port={free_port()}', script, *script_args]
    # TMPDIR: torchrun leaves a torchelastic_* folder in the temporary folder; keep it in the test's own
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
               TMPDIR=str(cwd))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=cwd) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun passes SIGTERM on to its workers, which run in sessions of their own
            proc.terminate()
            try:
                output, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            kill_processes_running(script)
            pytest.fail(f'the distributed run did not finish in {timeout} s (hung?):\n{output[-3000:]}')
    return proc.returncode, output


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory, demo):
    """6 iterations on 2 processes; discriminator from iteration 3; a NaN batch on process 1 at iteration 2;
    dead-code restarts every 4 (counted) steps."""
    root = tmp_path_factory.mktemp('ddp')
    driver = root / 'rank_driver.py'
    driver.write_text(RANK_DRIVER, encoding='utf-8')
    argv = ['-opt', STAGE0_YML, '--launcher', 'pytorch', '--force_yml', f'datasets:train:dataroot_gt={demo}/train',
            f'datasets:val:dataroot_gt={demo}/val', 'datasets:train:gt_size=32', 'datasets:train:batch_size_per_gpu=2',
            'network_g:ch_mult=[1,1,1,1,1]', 'network_d:ndf=8', 'val=~', 'logger:pbar=false', 'logger:print_freq=1',
            'logger:save_checkpoint_freq=3', 'train:total_iter=6', 'train:vqgan_loss_opt:disc_start=3',
            'train:max_bad_steps=3', 'train:codebook_restart_every=4']
    returncode, output = torchrun(str(driver), [str(root), json.dumps({'1': [2]}), *argv], nproc=2, timeout=150,
                                  cwd=root)
    assert returncode == 0, output[-3000:]
    dumps = [torch.load(root / f'rank{rank}.pt', weights_only=True) for rank in (0, 1)]
    return str(root), osp.join(str(root), 'experiments', NAME), dumps


def test_both_processes_hold_the_same_weights(ddp_run):
    _, exp, (rank0, rank1) = ddp_run
    # each process trained on batches of its own...
    assert sorted(rank0['batches']) == sorted(rank1['batches']) == list(range(1, 7))
    assert all(rank0['batches'][i] != rank1['batches'][i] for i in range(1, 7))
    # ...and yet the parameters are identical, bit for bit (DDP averaged the gradients)
    assert rank0['parameters'].keys() == rank1['parameters'].keys()
    for key, value in rank0['parameters'].items():
        assert torch.equal(value, rank1['parameters'][key]), key
    # what process 0 saved is what both hold (BatchNorm statistics: process 0's, which DDP
    # broadcasts to the others at the start of every forward)
    for label in ('net_g', 'net_d'):
        saved = load_state_dict(osp.join(exp, 'models', f'{label}_latest.pth'))
        for key, value in saved.items():
            held = rank0['parameters'].get(f'{label}.{key}', rank0['buffers'].get(f'{label}.{key}'))
            assert torch.equal(held, value), (label, key)
    # the networks did train, the discriminator included
    for label in ('net_g', 'net_d'):
        at3, at6 = (load_state_dict(osp.join(exp, 'models', f'{label}_{i}.pth')) for i in (3, 6))
        assert any(not torch.equal(at3[k], at6[k]) for k in at3), label


def test_a_nan_on_one_process_skips_the_step_on_all(ddp_run):
    _, exp, _ = ddp_run
    logs = glob.glob(osp.join(exp, 'train_*.log'))
    assert len(logs) == 1  # process 0's
    with open(logs[0], encoding='utf-8') as f:
        log = f.read()
    assert 'World size: 2' in log
    assert 'non-finite loss (on another process): step skipped (1 in a row, limit 3)' in log
    with open(osp.join(exp, 'train_log.csv'), newline='', encoding='utf-8') as f:
        assert [int(r['iter']) for r in csv.DictReader(f)] == [1, 3, 4, 5, 6]  # 2 was skipped everywhere


def test_only_process_zero_writes(ddp_run):
    root, exp, _ = ddp_run
    assert sorted(os.listdir(osp.join(root, 'experiments'))) == [NAME]
    assert sorted(os.listdir(exp)) == sorted(['models', 'training_states', 'visualization', 'train_log.csv',
                                              osp.basename(STAGE0_YML), osp.basename(glob.glob(f'{exp}/*.log')[0])])
    assert sorted(os.listdir(osp.join(exp, 'models'))) == sorted(f'net_{n}_{i}.pth' for n in 'gd'
                                                                  for i in (3, 6, 'latest'))
    assert sorted(os.listdir(osp.join(exp, 'training_states'))) == ['3.state', '6.state']
    state = load_checkpoint(osp.join(exp, 'training_states', '6.state'))
    assert state['iter'] == 6 and state['networks'] == ['net_g', 'net_d']
    # restart counts of the partial interval, summed over both processes: steps 1, 3, 4, 5 made an
    # interval (2 was skipped), step 6 began the next: 1 step x 2 processes x 2 images x 2x2 codes
    restart = state['codebook_restart']
    assert restart['iterations'] == 1 and int(restart['hits'].sum()) == 16
