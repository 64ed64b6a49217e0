"""CPU memory settings of vqir's processes: page reuse for training, huge pages for large tensors.

PyTorch's CPU allocator is plain ``malloc``/``free``. With glibc's defaults, every block above
the mmap threshold (at most 32 MiB) gets fresh pages from the kernel and gives them back on
``free``; a full-resolution activation is such a block (128 x 256 x 256 float32 is 32 MiB), so
each layer pays page faults and page zeroing for its output: allocating and filling a 32 MiB
tensor costs about 10 ms on 4 KiB pages, ten times the fill itself. Two remedies:

* :func:`use_huge_pages` (the entry points call it first: ``train.py``, ``test.py``,
  ``vqir-rescale``, the benchmark and the demo): PyTorch places CPU
  tensors of 2 MiB and more on transparent huge pages (its ``THP_MEM_ALLOC_ENABLE``), one page
  fault per 2 MiB instead of per 4 KiB. Measured: a fresh 32 MiB tensor 4-5 ms instead of 10-14
  ms; a 512x512 round trip 13.2 s instead of 15.9 s, peak memory unchanged within 5 %.
  PyTorch reads the setting once, at its first CPU allocation (importing torch, basicsr and vqir
  allocates nothing), so it only takes effect when called before the process's first tensor; a
  value already in the environment is kept.
* :func:`keep_freed_memory` (training only, ``train.py``): serve every allocation from the heap
  (no per-block mmap) and never trim it, so that later layers and later iterations reuse the
  pages: with fixed-size batches every iteration allocates the same blocks again. Memory freed
  inside the process is not returned to the system until it exits. Not for inference: with
  images of many sizes (``vqir-rescale``, ``test.py``, tiles) the heap fragments; a 2040x1356
  round trip in 6 tiles peaked at 6.2 GB resident with it and 4.3 GB without (1024x1024 in one
  piece: 6.5 and 5.1 GB).

``VQIR_MALLOC=default`` in the environment turns both off. Elsewhere than on glibc (macOS,
Windows, musl) :func:`keep_freed_memory` does nothing; huge pages need Linux with transparent
huge pages in ``always`` or ``madvise`` mode, and are silently skipped elsewhere by PyTorch.
"""
import ctypes
import ctypes.util
import os
import platform
import re

__all__ = ['keep_freed_memory', 'use_huge_pages', 'transparent_huge_page_mode']

# <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = None


def _turned_off():
    return os.environ.get('VQIR_MALLOC', '').lower() == 'default'


def transparent_huge_page_mode():
    """The kernel's transparent huge page mode: 'always', 'madvise', 'never', or None where unknown."""
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            return re.search(r'\[(\w+)\]', f.read()).group(1)
    except (OSError, AttributeError):
        return None


def use_huge_pages():
    """Let PyTorch put CPU tensors of 2 MiB and more on transparent huge pages, unless the
    environment already says otherwise (``THP_MEM_ALLOC_ENABLE`` set, or ``VQIR_MALLOC=default``).

    Returns True when the setting asks for huge pages. It works only if torch has not allocated
    CPU memory yet in this process (PyTorch reads it once); it is inherited by child processes.
    """
    if _turned_off():
        return False
    os.environ.setdefault('THP_MEM_ALLOC_ENABLE', '1')
    return os.environ['THP_MEM_ALLOC_ENABLE'] == '1'


def keep_freed_memory():
    """Serve every allocation from the heap (no per-block mmap) and never trim it.

    Returns True when glibc accepted the settings, False when they were not applied (not
    glibc, or ``VQIR_MALLOC=default``). Safe to call more than once.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if _turned_off() or platform.system() != 'Linux':
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
