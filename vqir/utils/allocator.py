"""Keep freed CPU memory in the process (glibc malloc), for training on CPU (``train.py``).

PyTorch's CPU allocator is plain ``malloc``/``free``. With glibc's defaults, every block above
the mmap threshold (at most 32 MiB) gets fresh pages from the kernel and gives them back on
``free``; a full-resolution activation is such a block (128 x 256 x 256 float32 is 32 MiB), so
each layer pays page faults and page zeroing for its output, a training step hundreds of times.
Serving all blocks from the heap and never trimming it lets later layers and later iterations
reuse the pages: with fixed-size batches every iteration allocates the same blocks again. Memory
freed inside the process is not returned to the system until it exits.

Only training uses it. With images of many sizes (``vqir-rescale``, ``test.py``, tiles) the heap
fragments: a 2040x1356 round trip in 4 tiles peaked at 7.8 GB resident with it and 4.8 GB
without.

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
