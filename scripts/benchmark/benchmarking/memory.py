"""Memory of a benchmark process: its resident set now and at its peak (Linux's /proc, else
``ru_maxrss``), CUDA allocations, a budget that turns running out of memory into an error, and
what such an error looks like.

Only the CUDA measurements need torch, and import it where they run: the parent processes of
``benchmark_tiling.py`` and ``soak_rescale.py`` use this module without loading torch.
"""
import ctypes
import ctypes.util
import gc
import resource
import sys

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library('c')
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    return _LIBC


def release_freed_memory():
    """Return memory freed by Python/torch to the OS (glibc keeps small freed blocks otherwise),
    so that a later peak starts from what is really in use."""
    gc.collect()
    libc = _libc()
    if libc and hasattr(libc, 'malloc_trim'):
        libc.malloc_trim(0)


def _status_kb(field, pid='self'):
    """A ``kB`` field of /proc/<pid>/status (``VmRSS``, ``VmHWM``, ``VmSize``), or None where unknown."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def resident_bytes(pid='self'):
    """The resident set of a process (this one by default) now, in bytes; None where unknown."""
    kb = _status_kb('VmRSS', pid)
    return kb * 1024 if kb is not None else None


def max_resident_bytes():
    """The peak resident set of this whole process so far (``ru_maxrss``), in bytes."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == 'darwin' else maxrss * 1024  # bytes on macOS, kB on Linux


class PeakMemory:
    """Peak memory of this process from ``reset()`` on: resident set (CPU) or CUDA allocations."""

    def __init__(self, device):
        self.device = device
        self.method = None

    def reset(self):
        if self.device.type == 'cuda':
            import torch
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = 'torch.cuda.max_memory_allocated'
            return
        release_freed_memory()
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # resets VmHWM to the current resident set
            self.method = 'VmHWM after clear_refs (peak RSS from model ready)'
        except OSError:
            self.method = 'ru_maxrss (peak RSS of the whole child)'

    def peak(self):
        if self.device.type == 'cuda':
            import torch
            torch.cuda.synchronize(self.device)
            return {'peak_bytes': torch.cuda.max_memory_allocated(self.device),
                    'peak_reserved_bytes': torch.cuda.max_memory_reserved(self.device), 'method': self.method}
        kb = _status_kb('VmHWM') if self.method and self.method.startswith('VmHWM') else None
        peak_bytes = kb * 1024 if kb is not None else max_resident_bytes()
        return {'peak_bytes': int(peak_bytes), 'method': self.method}


def limit_address_space(limit_bytes):
    """Make allocations beyond ``limit_bytes`` more than now fail with an error instead of
    waking the kernel's out-of-memory killer (which may pick another process)."""
    if not limit_bytes:
        return None
    size_kb = _status_kb('VmSize')
    if size_kb is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    new = size_kb * 1024 + int(limit_bytes)
    if hard != resource.RLIM_INFINITY:
        new = min(new, hard)
    resource.setrlimit(resource.RLIMIT_AS, (new, hard))
    return new


def is_out_of_memory(err):
    text = str(err)
    return isinstance(err, MemoryError) or 'can\'t allocate memory' in text or 'out of memory' in text.lower()


def gb(value):
    """Bytes in GiB (None stays None)."""
    return None if value is None else value / 1024**3
