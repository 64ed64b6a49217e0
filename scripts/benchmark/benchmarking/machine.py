"""What the benchmark records about the machine and the run: CPU model and flags, available memory,
load, the commit, torch's build."""
import os
import platform
import subprocess
import sys
from collections import OrderedDict

import torch

from vqir.utils.allocator import transparent_huge_page_mode

from benchmarking import ROOT
from benchmarking.memory import gb


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return [f for f in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile') if f in flags]
    except OSError:
        pass
    return []


def mem_available_bytes():
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def git_commit():
    try:
        out = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(args, devices):
    info = OrderedDict(
        torch=torch.__version__, python=platform.python_version(), threads=args.threads,
        cpu_model=cpu_model(), cpu_count=os.cpu_count(), cpu_flags=cpu_flags(), devices=devices, dtype=args.dtype,
        cpu_capability=getattr(torch.backends.cpu, 'get_cpu_capability', lambda: None)(),
        mkldnn=torch.backends.mkldnn.is_available(), malloc=args.malloc,
        huge_pages=os.environ.get('THP_MEM_ALLOC_ENABLE') == '1', transparent_hugepage=transparent_huge_page_mode(),
        load_average_start=load_average(),
        mem_available_gb=gb(mem_available_bytes()), commit=git_commit(), argv=sys.argv[1:])
    if 'cuda' in devices:
        info['gpu'] = torch.cuda.get_device_name(0)
    return info
