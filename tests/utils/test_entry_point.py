"""vqir.utils.entry_point.run_pipeline: a user's mistake (an InputError such as OptionsError) is one
error line on the terminal and in the run log, exit status 1; any other exception keeps its traceback."""
import subprocess
import sys

import pytest

from helpers import ROOT, cli_env, error_lines

_PIPELINE_SCRIPT = '''
import sys
from vqir.utils.entry_point import run_pipeline
from vqir.utils.options import OptionsError
from vqir.utils.run_logger import init_run_logger

def pipeline(root, argv):
    init_run_logger(sys.argv[1])
    if sys.argv[2] == 'user':
        raise OptionsError('bad.yml: option train:lr is not a number')
    raise RuntimeError('size mismatch in a layer (a bug)')

run_pipeline(pipeline)
'''


@pytest.mark.parametrize('kind', ['user', 'fault'])
def test_user_errors_are_one_line_and_faults_keep_their_traceback(tmp_path, kind):
    """A user's mistake: one error line on the terminal and in the run log. Anything else (here a
    RuntimeError, as a shape bug or a CUDA out-of-memory raise): the traceback on both."""
    log = tmp_path / 'run.log'
    env = {k: v for k, v in cli_env().items() if k != 'VQIR_TRACEBACK'}
    proc = subprocess.run([sys.executable, '-c', _PIPELINE_SCRIPT, str(log), kind], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    logged = log.read_text()
    assert proc.returncode == 1, proc.stderr
    if kind == 'user':
        assert error_lines(proc.stderr) == ['error: bad.yml: option train:lr is not a number'], proc.stderr
        assert 'Traceback' not in proc.stderr + logged
        assert 'error: bad.yml: option train:lr is not a number' in logged
    else:
        for text in (proc.stderr, logged):
            assert 'Traceback (most recent call last)' in text and 'RuntimeError: size mismatch in a layer' in text
        assert not error_lines(proc.stderr)
