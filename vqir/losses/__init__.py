"""Import every `*_loss.py` module here so that its losses register (Real-ESRGAN pattern)."""
import importlib
from os import path as osp

from basicsr.utils import scandir

_folder = osp.dirname(osp.abspath(__file__))
_filenames = sorted(osp.splitext(osp.basename(v))[0] for v in scandir(_folder) if v.endswith('_loss.py'))
_modules = [importlib.import_module(f'vqir.losses.{name}') for name in _filenames]
