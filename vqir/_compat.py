"""The one place where vqir adapts basicsr 1.4.2 to current torchvision.

basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor`` (removed in torchvision
0.17) at import time, so without this even ``import basicsr.utils.registry`` fails. We
provide that module name with the single function basicsr takes from it. This module must
be imported before anything from basicsr; ``vqir/__init__.py`` does so first.
"""
import sys
import types

try:  # older torchvision still ships the module: nothing to do
    import torchvision.transforms.functional_tensor  # noqa: F401
except ImportError:
    import torchvision.transforms.functional as _tvf

    _shim = types.ModuleType('torchvision.transforms.functional_tensor')
    _shim.rgb_to_grayscale = _tvf.rgb_to_grayscale
    sys.modules['torchvision.transforms.functional_tensor'] = _shim
