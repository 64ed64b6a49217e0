"""How many full-resolution maps the inference forward keeps alive at once (the peak memory of
a large image is a few such maps). Measured as the bytes glibc malloc has handed out, sampled
before and after every module, relative to the bytes in use before the call."""
import ctypes
import ctypes.util
import platform

import pytest
import torch

from vqir.archs.msrm_arch import MSRM
from vqir.archs.vqgan_arch import ResnetBlock


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
                                                      'fsmblks', 'uordblks', 'fordblks', 'keepcost')]


def _mallinfo2():
    """glibc's mallinfo2 (2.33 and later), or None."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return None
    mallinfo2 = getattr(ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6'), 'mallinfo2', None)
    if mallinfo2 is not None:
        mallinfo2.restype = _MallInfo2
    return mallinfo2


_MALLINFO2 = _mallinfo2()
pytestmark = pytest.mark.skipif(_MALLINFO2 is None, reason='counts glibc malloc bytes (mallinfo2, glibc >= 2.33)')


def _bytes_in_use():
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd  # heap blocks in use + mmap'd blocks


def _peak_new_bytes(module, run):
    """Largest increase of malloc'd bytes over the call, seen at every module's entry and exit.
    The call runs twice first, so that one-off allocations (kernel caches, thread buffers) are
    not counted."""
    for _ in range(2):
        run()
    samples = []

    def sample(*_):
        samples.append(_bytes_in_use())

    hooks = [m.register_forward_pre_hook(sample) for m in module.modules()]
    hooks += [m.register_forward_hook(sample) for m in module.modules()]
    base = _bytes_in_use()
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return max(samples) - base


@torch.no_grad()
def test_resnet_block_holds_at_most_two_new_maps():
    # x stays alive for the skip; conv1's output must be gone before conv2 allocates its own
    block = ResnetBlock(64, 64).eval()
    x = torch.randn(1, 64, 128, 128)  # 4 MiB maps
    ratio = _peak_new_bytes(block, lambda: block(x)) / x.nbytes
    assert 1.9 < ratio < 2.5, ratio


@torch.no_grad()
def test_msrm_frees_gate_and_product_before_the_full_resolution_blocks():
    # at full resolution only the gated input and one block's conv input and output are new
    msrm = MSRM(ch=64, ch_mult=[1, 1, 2], attn_mult=[1]).eval()
    feats = {
        'Level_1': torch.randn(1, 64, 128, 128),
        'Level_2': torch.randn(1, 64, 64, 64),
        'Level_4': torch.randn(1, 128, 32, 32),
    }
    ratio = _peak_new_bytes(msrm, lambda: msrm(feats)) / feats['Level_1'].nbytes
    assert 2.9 < ratio < 3.5, ratio
