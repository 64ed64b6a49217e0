"""The training entry point's malloc setting: applied on glibc, skipped on request, harmless to repeat."""
import platform
import subprocess
import sys

import pytest

from vqir.utils.allocator import transparent_huge_page_mode

SNIPPET = '''
import ctypes, torch
from vqir.utils.allocator import keep_freed_memory
first = keep_freed_memory()
assert keep_freed_memory() is first  # applied once, remembered
# the process still allocates and frees large blocks normally
for _ in range(3):
    x = torch.ones(64, 1024, 1024)
    assert x.sum().item() == 64 * 1024 * 1024
    del x
print(first)
'''


def _run(env_value=None):
    env = {'PATH': '/usr/bin:/bin'}
    if env_value is not None:
        env['VQIR_MALLOC'] = env_value
    out = subprocess.run([sys.executable, '-c', SNIPPET], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_keep_freed_memory_applies_on_glibc_and_can_be_turned_off():
    assert _run() == 'True'
    assert _run('default') == 'False'


HUGE_PAGES_SNIPPET = '''
import os, re
import torch
import vqir  # noqa: F401  (registers components, changes nothing in the process)
from vqir.utils.entry_point import run_pipeline
assert os.environ.get('THP_MEM_ALLOC_ENABLE') == os.environ.get('SETTING_BEFORE'), 'import vqir changed the process'


def pipeline(root, argv):  # what train.py and test.py run: the entry point decides the page size first
    x = torch.ones(64, 1024, 1024)  # 256 MiB, every page touched
    with open('/proc/self/smaps_rollup') as f:
        huge_kb = int(re.search(r'AnonHugePages:\\s+(\\d+) kB', f.read()).group(1))
    print(os.environ.get('THP_MEM_ALLOC_ENABLE'), huge_kb)


run_pipeline(pipeline)
'''


def _run_huge_pages(**env):
    env = {'PATH': '/usr/bin:/bin', **env}
    if 'THP_MEM_ALLOC_ENABLE' in env:
        env['SETTING_BEFORE'] = env['THP_MEM_ALLOC_ENABLE']
    out = subprocess.run([sys.executable, '-c', HUGE_PAGES_SNIPPET], capture_output=True, text=True, env=env,
                         check=True)
    setting, huge_kb = out.stdout.strip().splitlines()[-1].split()
    return setting, int(huge_kb)


@pytest.mark.skipif(transparent_huge_page_mode() not in ('always', 'madvise'), reason='needs transparent huge pages')
def test_entry_points_put_large_tensors_on_huge_pages_unless_told_otherwise():
    setting, huge_kb = _run_huge_pages()
    assert setting == '1'
    assert huge_kb >= 128 * 1024  # most of the 256 MiB tensor
    # the user's own setting wins, and VQIR_MALLOC=default leaves PyTorch's default alone
    assert _run_huge_pages(THP_MEM_ALLOC_ENABLE='0')[0] == '0'
    setting, huge_kb = _run_huge_pages(VQIR_MALLOC='default')
    assert setting == 'None'
    if transparent_huge_page_mode() == 'madvise':  # only asked-for regions get huge pages
        assert huge_kb < 16 * 1024
