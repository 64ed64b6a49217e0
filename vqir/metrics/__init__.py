"""Import every `*_metric.py` module here so that its metrics register (Real-ESRGAN pattern)."""
import importlib
from os import path as osp

from basicsr.utils import scandir

_folder = osp.dirname(osp.abspath(__file__))
_filenames = sorted(osp.splitext(osp.basename(v))[0] for v in scandir(_folder) if v.endswith('_metric.py'))
_modules = [importlib.import_module(f'vqir.metrics.{name}') for name in _filenames]
