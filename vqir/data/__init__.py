"""Import every `*_dataset.py` module here so that its datasets register (Real-ESRGAN pattern)."""
import importlib
from os import path as osp

from basicsr.utils import scandir

_folder = osp.dirname(osp.abspath(__file__))
_filenames = sorted(osp.splitext(osp.basename(v))[0] for v in scandir(_folder) if v.endswith('_dataset.py'))
_modules = [importlib.import_module(f'vqir.data.{name}') for name in _filenames]
