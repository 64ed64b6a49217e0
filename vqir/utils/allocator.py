"""Keep freed CPU memory in the process (glibc malloc), for the command-line entry points.

PyTorch's CPU allocator is plain ``malloc``/``free``. With glibc's defaults, every block above
the mmap threshold (at most 32 MiB) gets fresh pages from the kernel and gives them back on
``free``; a full-resolution decoder activation is such a block (128 x 512 x 512 float32 is
128 MiB), so each layer pays page faults and page zeroing for its output: about a fifth of the
CPU time of a VQIR forward on 2 cores. Serving all blocks from the heap and never trimming it
lets later layers reuse the pages. Memory freed inside the process is not returned to the
system until it exits, so the resident size stays at its peak; the peak itself does not grow.

``VQIR_MALLOC=default`` in the environment leaves glibc's settings alone. Elsewhere than on glibc
(macOS, Windows, musl) :func:`keep_freed_memory` does nothing.
"""
import ctypes
import ctypes.util
import os
import platform

__all__ = ['keep_freed_memory']

# <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = None


def keep_freed_memory():
    """Serve every allocation from the heap (no per-block mmap) and never trim it.

    Returns True when glibc accepted the settings, False when they were not applied (not
    glibc, or ``VQIR_MALLOC=default``). Safe to call more than once.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get('VQIR_MALLOC', '').lower() == 'default' or platform.system() != 'Linux':
        return False
    if platform.libc_ver()[0] != 'glibc':
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int: 2**31 - 1 bytes is "never" for our maps
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
