"""Build and install tokcomp, with its compiled kernels as the extension `tokcomp._C`.

The pinned stack (torch first) is installed separately from requirements.txt; build with
`pip install --no-build-isolation -e .` so the extension compiles against that torch.

TOKCOMP_CUDA selects the CUDA kernels: "auto" (default) builds them when torch sees a GPU and a
CUDA toolkit is found, "1" always builds them (error without a toolkit), "0" never does.
Without a visible GPU, TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0". Without CUDA kernels, CUDA
tensors can use the same kernels compiled at run time by cupy: `pip install tokcomp[cupy]`.
TOKCOMP_EXTENSION=0 installs without compiling: the kernels are then those already built in the
source tree (by an editable install, as `make install` does), else the PyTorch reference.

`pip install tokcomp[lmms]` adds lmms-eval, which finds tokcomp's lmms-eval model (`--model
tokcomp`) through the `lmms_eval.models` entry point below.
"""

from __future__ import annotations

import glob
import os
import platform
import runpy
import shutil
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
#: The CUDA kernel headers (device code) ship inside the package, as tokcomp/csrc/cuda/*.cuh:
#: the cupy route compiles them at run time with NVRTC (tokcomp/ops/cupy_kernels.py), the same
#: files the extension's csrc/cuda/*.cu include for nvcc. They stay in csrc/ in the repository.
KERNEL_PACKAGE = "tokcomp.csrc.cuda"


def _locate_cuda_home() -> None:
    """Point CUDA_HOME at a full toolkit (bin/nvcc and include/cuda_runtime.h) before torch looks
    for one: torch takes nvcc's parent directory, which is wrong when nvcc on PATH is a
    wrapper script (e.g. /usr/local/bin/nvcc calling /usr/local/cuda-13.0/bin/nvcc)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        has_nvcc = os.path.isfile(os.path.join(home, "bin", "nvcc"))
        if has_nvcc and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _library_include_flags(cuda_home: str) -> list[str]:
    """-isystem dirs of the CUDA math library headers torch's CUDA headers include (cusparse.h,
    cublas_v2.h, cusolverDn.h) when the toolkit lacks them: those of the nvidia-* wheels
    installed with torch. -isystem keeps the toolkit's own headers first."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import torch

    sites = {os.path.dirname(os.path.dirname(torch.__file__)), sysconfig.get_paths()["purelib"]}
    flags = []
    for site in sorted(sites):
        for include in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
            flags += ["-isystem", include]
    return flags


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("TOKCOMP_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on"):
        if CUDA_HOME is None:
            raise RuntimeError(
                "TOKCOMP_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. "
                "/usr/local/cuda) or put nvcc on PATH, or build with TOKCOMP_CUDA=0"
            )
        if torch.version.cuda is None:
            raise RuntimeError(
                f"TOKCOMP_CUDA=1 but torch {torch.__version__} is a CPU-only build; "
                "install a CUDA build of torch or build with TOKCOMP_CUDA=0"
            )
        return True
    if mode != "auto":
        raise ValueError(f"TOKCOMP_CUDA must be auto, 0 or 1, got {mode!r}")
    return torch.cuda.is_available() and CUDA_HOME is not None


def _extensions() -> tuple[list, dict]:
    """The `tokcomp._C` extension and the build command class that compiles it."""
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def sources(*patterns: str) -> list[str]:
        found = []
        for pattern in patterns:
            found += sorted(glob.glob(os.path.join(CSRC, pattern), root_dir=ROOT))
        return found

    # -fno-trapping-math: no kernel enables floating-point exceptions, and without the flag GCC
    # keeps a float compare-and-select as a branch, which stops energy_score's ELU loop from
    # vectorising (a 1.4-2.7x slower op; the results are bit for bit the same either way).
    # -g0: no debug info (Python's build flags add -g): it records pip's random build folder, so
    # each build of the same sources was another file, and tokcomp's fingerprint hashes it.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-g0"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # AVX2 + FMA (+ F16C, on every AVX2 CPU): any x86-64 CPU since 2013-2015. No -march=native.
        cxx_flags += ["-mavx2", "-mfma", "-mf16c"]
    link_flags = ["-fopenmp"]
    cpp_sources = sources("*.cpp", "cpu/*.cpp")

    if _want_cuda():
        from torch.utils.cpp_extension import CUDA_HOME

        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        library_includes = _library_include_flags(CUDA_HOME)
        extension = CUDAExtension(
            "tokcomp._C",
            cpp_sources + sources("cuda/*.cu"),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags + library_includes,
                "nvcc": ["-O3", "-lineinfo", *library_includes],
            },
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            "tokcomp._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [extension], {"build_ext": BuildExtension}


_locate_cuda_home()
#: tokcomp/libraries.py's names: the oldest supported releases, written once there.
LIBRARIES = runpy.run_path(os.path.join(ROOT, "tokcomp", "libraries.py"))

ext_modules, cmdclass = _extensions() if os.environ.get("TOKCOMP_EXTENSION") != "0" else ([], {})

setup(
    name="tokcomp",
    version="0.3.0",
    description="Token compression for vision transformers and VLMs (ToMe-style merging)",
    packages=[
        *find_packages(include=["tokcomp", "tokcomp.*"], exclude=["tests", "tests.*"]),
        KERNEL_PACKAGE,
    ],
    package_dir={KERNEL_PACKAGE: os.path.join(CSRC, "cuda")},
    package_data={KERNEL_PACKAGE: ["*.cuh"]},
    python_requires=">=3.10",
    install_requires=[f"torch>={LIBRARIES['TORCH'].minimum}"],
    extras_require={
        # tokcomp[timm], tokcomp[open_clip], tokcomp[transformers]: the oldest supported releases
        **LIBRARIES["extras"](),
        "cupy": ["cupy-cuda13x==14.2.0"],
        # lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed
        "lmms": ["lmms-eval==0.7.3", "filelock<4"],
    },
    entry_points={
        "console_scripts": ["tokcomp=tokcomp.cli:main"],
        "lmms_eval.models": ["tokcomp=tokcomp.harness.lmms_plugin:manifest"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
