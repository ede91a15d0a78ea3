"""fdpg's build. The Triton kernels in kernels/ install as ``fdpg.kernels``; nothing is downloaded at build time."""
from setuptools import setup

setup(
    name="fdpg",
    version="0.1.0",
    description="Fused GPU kernels and a fast training loop for distribution matching (DPG, GDC++, f-DPG, KL-control)",
    python_requires=">=3.10",
    packages=["fdpg", "fdpg.ops", "fdpg.kernels"],
    package_dir={"fdpg": "fdpg", "fdpg.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',
        "transformers>=4.45",
        "numpy",
        "pyyaml",
    ],
    extras_require={
        "plot": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["fdpg = fdpg.cli:main"]},
)
