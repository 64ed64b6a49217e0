"""What `vqir/train.py` and `vqir/test.py` share: the project root and one-line errors."""
import os
import sys
from os import path as osp


def project_root():
    """The checkout (parent of the package): where experiments/, results/ and tb_logger/ go by default."""
    return osp.abspath(osp.join(osp.dirname(__file__), osp.pardir, osp.pardir))


def run_pipeline(pipeline, argv=None):
    """Run ``pipeline(root, argv)``; a bad option, file or checkpoint ends the process with one
    ``error:`` line and exit status 1 (set VQIR_TRACEBACK=1 to see the traceback)."""
    try:
        return pipeline(project_root(), argv)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if os.environ.get('VQIR_TRACEBACK'):
            raise
        print(f'error: {err}', file=sys.stderr)
        sys.exit(1)
