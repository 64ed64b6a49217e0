"""Distributed set-up on PyTorch's own engine (torchrun / slurm), on GPUs or CPUs.

basicsr's ``init_dist`` hard-codes NCCL and divides ranks by the CUDA device count, so it
cannot start on a CPU-only machine. Here the backend follows the hardware: NCCL when CUDA is
available, gloo otherwise. Everything else (``get_dist_info``, ``master_only``) is basicsr's.
"""
import os
import subprocess

import torch
import torch.distributed as dist
from basicsr.utils.dist_util import get_dist_info, master_only  # noqa: F401  (re-exported)

from .errors import InputError


class LauncherError(InputError, ValueError, RuntimeError):
    """``--launcher`` names no known launcher, or the process was not started by it."""


def default_backend():
    return 'nccl' if torch.cuda.is_available() else 'gloo'


def init_dist(launcher, backend=None, port=None):
    """Join the process group started by ``launcher`` ('pytorch' = torchrun, or 'slurm')."""
    backend = backend or default_backend()
    if launcher == 'slurm':
        _export_slurm_env(port)
    elif launcher != 'pytorch':
        raise LauncherError(f"unknown launcher '{launcher}' (expected none, pytorch or slurm)")
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        if key not in os.environ:
            raise LauncherError(f'--launcher {launcher} needs the environment variable {key}; '
                                'start the job with torchrun (or srun for slurm)')
    if backend == 'nccl':
        local_rank = int(os.environ.get('LOCAL_RANK', int(os.environ['RANK']) % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)


def _export_slurm_env(port):
    """Translate slurm's variables into the ones ``init_process_group`` reads."""
    proc_id = int(os.environ['SLURM_PROCID'])
    ntasks = int(os.environ['SLURM_NTASKS'])
    node_list = os.environ['SLURM_NODELIST']
    tasks_per_node = int(os.environ.get('SLURM_NTASKS_PER_NODE', '1').split('(')[0])
    addr = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1')
    os.environ.setdefault('MASTER_PORT', str(port or 29500))
    os.environ['MASTER_ADDR'] = addr
    os.environ['WORLD_SIZE'] = str(ntasks)
    os.environ['LOCAL_RANK'] = str(proc_id % max(tasks_per_node, 1))
    os.environ['RANK'] = str(proc_id)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_distributed():
        dist.barrier()
