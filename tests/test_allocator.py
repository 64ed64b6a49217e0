"""The training entry point's malloc setting: applied on glibc, skipped on request, harmless to repeat."""
import platform
import subprocess
import sys

import pytest

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
