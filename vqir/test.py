"""`python vqir/test.py -opt options/test/<file>.yml` (see README for --launcher and --force_yml).

Multi-GPU / multi-process: `torchrun --nproc_per_node=N vqir/test.py -opt <file>.yml --launcher pytorch`.
"""
import sys
from os import path as osp

if __name__ == '__main__':
    # Run from a checkout without installing: make the package importable, not this folder.
    _here = osp.dirname(osp.abspath(__file__))
    sys.path = [p for p in sys.path if osp.abspath(p or '.') != _here]
    sys.path.insert(0, osp.dirname(_here))

import vqir  # noqa: E402,F401  (registers archs, datasets, losses, metrics, models)
from vqir.test_pipeline import main  # noqa: E402

if __name__ == '__main__':
    main()
