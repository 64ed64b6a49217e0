"""The modules of the benchmark scripts beside this folder: ``benchmark.py`` is built from all of
them; ``benchmark_tiling.py`` and ``soak_rescale.py`` share its image sizes and memory measuring.

The scripts put their own folder on ``sys.path`` and import these as ``benchmarking.<module>``.
"""
from os import path as osp

# the repository root: scripts/benchmark/benchmarking/ -> the folder above scripts/
ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir, osp.pardir, osp.pardir))
