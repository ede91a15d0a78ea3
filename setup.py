"""fdpg's build. The Triton kernels in kernels/ install as ``fdpg.kernels``; nothing is downloaded at build time.

The CUDA C++ extension (csrc/, loaded as ``fdpg/_fdpg_cuda*.so`` by fdpg/_cuda.py) is built when nvcc and a CUDA
build of torch are importable here (``pip install -e . --no-deps --no-build-isolation`` on a GPU machine), or when
``FDPG_BUILD_CUDA=1`` (then a failure stops the install); ``FDPG_BUILD_CUDA=0`` never builds it. Otherwise, e.g.
in pip's isolated build environment where torch is absent, it is skipped and fdpg runs on Triton/torch. Target
architectures: ``$FDPG_CUDA_ARCHS`` ("80,90") or ``$TORCH_CUDA_ARCH_LIST``, default sm_80 and sm_90 (+ PTX).
"""
import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_EXT = "fdpg._fdpg_cuda"


def _recipe():
    spec = importlib.util.spec_from_file_location("_fdpg_cuda_build", os.path.join(HERE, "csrc", "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_plan():
    """(build, forced, reason it is not built)."""
    flag = os.environ.get("FDPG_BUILD_CUDA", "").strip()
    if flag == "0":
        return False, False, "FDPG_BUILD_CUDA=0"
    forced = flag == "1"
    if not os.path.isfile(os.path.join(HERE, "csrc", "build.py")):
        return False, forced, "csrc/ is not part of this source tree"
    try:
        import torch
    except Exception as e:  # pip's isolated build environment has no torch
        return False, forced, (f"torch is not importable here ({type(e).__name__}); to build the extension install "
                               "with --no-build-isolation")
    if _recipe().find_nvcc() is None:
        return False, forced, "nvcc not found (set CUDA_HOME or put nvcc on the PATH)"
    if torch.version.cuda is None and not forced:
        return False, False, "torch is a CPU build (FDPG_BUILD_CUDA=1 builds the extension anyway)"
    return True, forced, ""


class BuildExt(build_ext):
    """Builds the CUDA extension with csrc/build.py; a failure skips it with a warning unless it was forced."""

    forced = False

    def build_extensions(self):
        self._skipped = []
        super().build_extensions()
        for ext in self._skipped:  # nothing to copy or install for them
            self.extensions.remove(ext)

    def build_extension(self, ext):
        if ext.name != CUDA_EXT:
            return super().build_extension(ext)
        out = self.get_ext_fullpath(ext.name)
        try:
            _recipe().build(out, build_dir=os.path.join(self.build_temp, "fdpg_cuda"),
                            jobs=self.parallel if isinstance(self.parallel, int) and self.parallel > 0
                            else os.cpu_count(), verbose=self.verbose > 1)
        except Exception as e:
            if self.forced:
                raise
            print(f"fdpg: WARNING: the CUDA extension failed to build and is skipped (fdpg falls back to "
                  f"Triton/torch): {e}", file=sys.stderr)
            self._skipped.append(ext)


build_cuda, BuildExt.forced, reason = _cuda_plan()
if build_cuda:
    ext_modules = [Extension(CUDA_EXT, sources=["csrc/binding.cpp", "csrc/logprobs.cu", "csrc/coefficients.cu"])]
else:
    ext_modules = []
    if BuildExt.forced:
        raise SystemExit(f"fdpg: FDPG_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"fdpg: the CUDA extension is not built ({reason})", file=sys.stderr)

setup(
    name="fdpg",
    version="0.1.0",
    description="Fused GPU kernels and a fast training loop for distribution matching (DPG, GDC++, f-DPG, KL-control)",
    python_requires=">=3.10",
    packages=["fdpg", "fdpg.ops", "fdpg.kernels"],
    package_dir={"fdpg": "fdpg", "fdpg.kernels": "kernels"},
    package_data={"fdpg": ["cpu_decode.c"]},      # compiled at first use by fdpg/cpu_decode.py
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
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
