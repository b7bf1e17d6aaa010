"""Compile-only check of the CUDA kernels (csrc/cuda/*.cu) for machines without a GPU.

Each file is compiled with `nvcc -c` and the flags torch's BuildExtension uses, for one
architecture. A success is cached in .cache/cuda-compile/ under a hash of the sources, the
headers they include, the flags, the torch version and nvcc's version, so a second run with
nothing changed is instant. Skipped only when nvcc cannot be found.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CACHE = ROOT / ".cache" / "cuda-compile"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
ARCH = "sm_90"


def _cuda_home() -> Path | None:
    """The CUDA toolkit, found like setup.py does: CUDA_HOME / CUDA_PATH, else the one of nvcc
    on PATH (through wrapper scripts), else /usr/local/cuda*; the first with bin/nvcc and
    include/cuda_runtime.h, else the first with bin/nvcc (which then fails loudly)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))[::-1]]
    homes = [Path(home) for home in candidates if home and (Path(home) / "bin" / "nvcc").is_file()]
    for home in homes:
        if (home / "include" / "cuda_runtime.h").is_file():
            return home
    return homes[0] if homes else None


def _library_include_flags(cuda_home: Path) -> list[str]:
    """-isystem dirs of the CUDA math library headers torch's headers use (cusparse.h,
    cublas_v2.h) when the toolkit lacks them: those of the nvidia-* wheels torch came with
    (the same rule as setup.py)."""
    if (cuda_home / "include" / "cusparse.h").is_file():
        return []
    flags = []
    for site in sorted({Path(torch.__file__).parents[1], Path(sysconfig.get_paths()["purelib"])}):
        for include in sorted(site.glob("nvidia/*/include")):
            flags += ["-isystem", str(include)]
    return flags


def _flags(cuda_home: Path) -> list[str]:
    """nvcc flags matching torch.utils.cpp_extension's for the tokcomp._C extension."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [
        *include_paths("cpu"),
        str(cuda_home / "include"),
        sysconfig.get_paths()["include"],
        str(CSRC),
    ]
    return [
        *COMMON_NVCC_FLAGS,
        "--compiler-options",
        "-fPIC",
        "-std=c++20",  # what torch's BuildExtension passes (its headers need C++20)
        f"-gencode=arch=compute_{ARCH[3:]},code={ARCH}",
        "-O3",
        "-lineinfo",
        "-DWITH_CUDA",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in includes),
        *_library_include_flags(cuda_home),
    ]


def _cache_key(source: Path, nvcc: str, flags: list[str]) -> str:
    digest = hashlib.sha256()
    for path in [source, *sorted(CSRC.rglob("*.h")), *sorted(CSRC.rglob("*.cuh"))]:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest.update("\0".join([*flags, torch.__version__, version]).encode())
    return digest.hexdigest()[:24]


def test_cuda_sources_exist() -> None:
    assert CUDA_SOURCES, "no csrc/cuda/*.cu files found"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles(source: Path, tmp_path: Path) -> None:
    cuda_home = _cuda_home()
    if cuda_home is None:
        pytest.skip("nvcc not found (no CUDA toolkit: set CUDA_HOME or put nvcc on PATH)")
    nvcc = str(cuda_home / "bin" / "nvcc")
    flags = _flags(cuda_home)
    stamp = CACHE / f"{source.stem}-{_cache_key(source, nvcc, flags)}.ok"
    if stamp.is_file():
        return
    command = [nvcc, *flags, "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, (
        f"nvcc failed on {source.relative_to(ROOT)} (exit {result.returncode})\n"
        f"command: {' '.join(command)}\n--- stderr ---\n{result.stderr}\n"
        f"--- stdout ---\n{result.stdout}"
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp.write_text(" ".join(command) + "\n")
