"""vqir: extreme image rescaling with a VQGAN generative prior and an invertible prior.

Importing the package registers every architecture, dataset, loss, metric and model in
basicsr's registries (the Real-ESRGAN pattern), so YAML ``type:`` keys resolve to them; it changes
nothing else in the process (memory settings are the entry points', see ``vqir.utils.allocator``).
"""
from . import _compat  # noqa: F401  (must come before any basicsr import)
from .archs import *  # noqa: F401,F403
from .data import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .metrics import *  # noqa: F401,F403
from .models import *  # noqa: F401,F403
from .version import __version__  # noqa: F401
