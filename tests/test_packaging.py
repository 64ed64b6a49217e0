"""What `pip install -r requirements.txt` puts into an environment."""
import importlib.metadata
import re
from os import path as osp

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))


def _names(requirements):
    """Distribution names of requirement strings (markers and versions dropped), lower case."""
    return {re.split(r'[\s<>=!~;\[]', req.strip(), maxsplit=1)[0].lower() for req in requirements if req.strip()}


def _project_requirements():
    with open(osp.join(ROOT, 'requirements.txt'), encoding='utf-8') as f:
        return [line.split('#')[0] for line in f]


def test_one_opencv_distribution():
    """basicsr requires opencv-python; a second OpenCV wheel (headless, contrib) would install a
    second copy of the cv2 module over the first."""
    names = _names(_project_requirements()) | _names(importlib.metadata.requires('basicsr') or [])
    opencv = sorted(name for name in names if name.startswith('opencv'))
    assert opencv == ['opencv-python'], opencv


def test_field_metric_libraries_stay_light():
    """DISTS, FID and KID come from libraries that pull in nothing beyond what the project already
    installs (pyiqa, the alternative, requires transformers, accelerate and more)."""
    installed = _names(_project_requirements()) | {'pillow', 'numpy', 'torch', 'torchvision', 'tqdm'}
    for library in ('piq', 'torch-fidelity'):
        needs = _names(req for req in importlib.metadata.requires(library) or [] if 'extra ==' not in req)
        assert needs <= installed, (library, sorted(needs - installed))
