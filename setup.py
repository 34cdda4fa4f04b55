"""Install the GANHead package (`lib`) in one step: `pip install -e .`.

torch is deliberately not listed in install_requires: CPU users get torch==2.13.0 from the
Makefile, GPU users bring their own CUDA build (env.yml), and pip must not replace it.
"""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#") and not line.startswith("pytest")
]

setup(
    name="ganhead",
    version="0.1.0",
    description="GANHead: generative animatable neural head avatars (CVPR 2023), reimplemented",
    packages=find_packages(include=["lib", "lib.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"test": ["pytest==9.2.0", "ruff==0.17.5"]},
)
