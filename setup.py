#!/usr/bin/env python
from os import path as osp

from setuptools import find_packages, setup


def get_version():
    scope = {}
    with open(osp.join(osp.dirname(__file__), 'vqir', 'version.py'), encoding='utf-8') as f:
        exec(f.read(), scope)
    return scope['__version__']


def get_requirements(filename='requirements.txt'):
    with open(osp.join(osp.dirname(__file__), filename), encoding='utf-8') as f:
        lines = (line.split('#')[0].strip() for line in f)
        return [line for line in lines if line and line != 'pytest']


setup(
    name='vqir',
    version=get_version(),
    description='Extreme image rescaling with a VQGAN generative prior and an invertible prior (VQIR)',
    long_description=open('README.md', encoding='utf-8').read() if osp.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=('vqir', 'vqir.*')),
    python_requires='>=3.9',
    install_requires=get_requirements(),
    extras_require={'wandb': ['wandb']},  # logger.wandb (optional, like BasicSR's)
    entry_points={'console_scripts': ['vqir-rescale=vqir.rescale:main']},
    license='Apache License 2.0',
    zip_safe=False,
)
