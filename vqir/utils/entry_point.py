"""What `vqir/train.py` and `vqir/test.py` share: the project root and how a run ends on an error."""
import logging
import os
import sys
from os import path as osp

from .allocator import use_huge_pages
from .errors import InputError


def project_root():
    """The checkout (parent of the package): where experiments/, results/ and tb_logger/ go by default."""
    return osp.abspath(osp.join(osp.dirname(__file__), osp.pardir, osp.pardir))


def _run_log_handlers():
    """The file handlers of the run log (basicsr's logger), once the run has opened one."""
    return [h for h in logging.getLogger('basicsr').handlers if isinstance(h, logging.FileHandler)]


def _to_run_log(message, handlers, exc_info=None):
    """Write one record to ``handlers`` only: the terminal gets the same text from the caller."""
    logger = logging.getLogger('basicsr')
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in handlers:
        handler.handle(record)


def run_pipeline(pipeline, argv=None):
    """Run ``pipeline(root, argv)``.

    The user's own mistakes (an :class:`~vqir.utils.errors.InputError`: options, files, checkpoints,
    images, missing weights; or a file that does not exist) end the process with one ``error:`` line,
    in the run log as well once there is one, and exit status 1 (``VQIR_TRACEBACK=1`` adds the
    traceback). Any other exception is a fault of the run or of the code: its traceback goes to the
    terminal and into the run log. Large tensors go on huge pages (``vqir.utils.allocator``).
    """
    use_huge_pages()  # before the run's first tensor: PyTorch reads the setting at its first allocation
    earlier_logs = set(_run_log_handlers())  # of an earlier run in this process: not this run's log

    def this_runs_log():
        return [h for h in _run_log_handlers() if h not in earlier_logs]

    try:
        return pipeline(project_root(), argv)
    except (InputError, FileNotFoundError) as err:
        if os.environ.get('VQIR_TRACEBACK'):
            raise
        _to_run_log(f'error: {err}', this_runs_log())
        print(f'error: {err}', file=sys.stderr)
        sys.exit(1)
    except Exception:
        _to_run_log('the run stopped on an unexpected error', this_runs_log(), exc_info=sys.exc_info())
        raise
