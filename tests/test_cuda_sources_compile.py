"""Compile-only checks of the CUDA kernels for machines without a GPU.

- csrc/cuda/*.cu (the extension's kernels): each file with `nvcc -c` and the flags torch's
  BuildExtension uses, for one architecture.
- The same kernel headers (csrc/cuda/*.cuh) as the cupy route compiles them: the program of
  tokcomp.ops.cupy_kernels, every instantiation it uses, by NVRTC through cupy's bindings (no
  device needed).

A success is cached in .cache/cuda-compile/ under a hash of the sources, the headers they
include, the flags, the torch version and the compiler's version, so a second run with nothing
changed is instant. Skipped only when the compiler cannot be found (nvcc; cupy for NVRTC).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tokcomp.ops import cupy_kernels

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


def _stamp(name: str, *parts: str) -> Path:
    """The cache file that records a successful compile of `parts` (sources, flags, versions)."""
    digest = hashlib.sha256("\0".join([*parts, torch.__version__]).encode()).hexdigest()[:24]
    return CACHE / f"{name}-{digest}.ok"


def test_cuda_sources_exist() -> None:
    assert CUDA_SOURCES, "no csrc/cuda/*.cu files found"


@dataclass(frozen=True)
class Compile:
    """One source's nvcc command and the stamp that records its success."""

    command: list[str]
    stamp: Path


@pytest.fixture(scope="module")
def nvcc_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Path, Future | None]]:
    """Every csrc/cuda/*.cu not compiled before (no stamp), started at once, as many at a time
    as there are cores (an nvcc of these files runs on one core for about a minute): source ->
    its (Compile, CompletedProcess) future, None where the stamp is there."""
    cuda_home = _cuda_home()
    if cuda_home is None:
        pytest.skip("nvcc not found (no CUDA toolkit: set CUDA_HOME or put nvcc on PATH)")
    nvcc = str(cuda_home / "bin" / "nvcc")
    flags = _flags(cuda_home)
    objects = tmp_path_factory.mktemp("cuda-objects")
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    runs: dict[Path, Future | None] = {}
    for source in CUDA_SOURCES:
        stamp = CACHE / f"{source.stem}-{_cache_key(source, nvcc, flags)}.ok"
        command = [nvcc, *flags, "-c", str(source), "-o", str(objects / f"{source.stem}.o")]
        job = Compile(command, stamp)
        runs[source] = None if stamp.is_file() else pool.submit(_compiled, job)
    yield runs
    pool.shutdown(wait=True)


def _compiled(job: Compile) -> tuple[Compile, subprocess.CompletedProcess]:
    """`job` and how its nvcc run ended."""
    return job, subprocess.run(job.command, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles(source: Path, nvcc_runs: dict[Path, Future | None]) -> None:
    run = nvcc_runs[source]
    if run is None:  # compiled before, with these sources, flags and versions
        return
    job, result = run.result()
    assert result.returncode == 0, (
        f"nvcc failed on {source.relative_to(ROOT)} (exit {result.returncode})\n"
        f"command: {' '.join(job.command)}\n--- stderr ---\n{result.stderr}\n"
        f"--- stdout ---\n{result.stdout}"
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    job.stamp.write_text(" ".join(job.command) + "\n")


def test_cupy_kernel_source_compiles_with_nvrtc() -> None:
    """What cupy does at run time (NVRTC, same options and name expressions), for sm_90."""
    if importlib.util.find_spec("cupy_backends") is None:
        pytest.skip("cupy is not installed (pip install cupy-cuda13x): NVRTC check skipped")
    from cupy_backends.cuda.libs import nvrtc

    # cupy adds -ftz=true and --device-as-default-execution-space to every NVRTC compile.
    implicit = ["-ftz=true", "--device-as-default-execution-space"]
    options = [f"-arch=compute_{ARCH[3:]}", *cupy_kernels.options(), *implicit]
    version = ".".join(map(str, nvrtc.getVersion()))
    source = cupy_kernels.source()  # names the kernel headers' digest
    stamp = _stamp("cupy-nvrtc", source, *cupy_kernels.NAME_EXPRESSIONS, *options, version)
    if stamp.is_file():
        return
    program = nvrtc.createProgram(source, "tokcomp_cupy.cu", [], [])
    try:
        for name in cupy_kernels.NAME_EXPRESSIONS:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as err:
            pytest.fail(f"NVRTC {version} failed ({err}):\n{nvrtc.getProgramLog(program)}")
        log = nvrtc.getProgramLog(program).strip()
        assert not log, f"NVRTC warnings:\n{log}"
        lowered = [nvrtc.getLoweredName(program, name) for name in cupy_kernels.NAME_EXPRESSIONS]
        assert all(lowered)
    finally:
        nvrtc.destroyProgram(program)
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp.write_text(" ".join(options) + "\n")


def test_launch_constants_come_from_the_headers() -> None:
    """The cupy route launches with the geometry the kernel headers declare."""
    constants = cupy_kernels.constants()
    assert constants["kTileA"] == constants["kSide"] * constants["kRowsA"]
    assert constants["kMergeMaxWarps"] == constants["kMergeMaxThreads"] // 32
    header = (CSRC / "cuda" / "weighted_merge.cuh").read_text()
    assert f"kMergeMaxChunk = {constants['kMergeMaxChunk']};" in header


def test_built_package_carries_the_kernel_headers(tmp_path: Path) -> None:
    """setup.py puts csrc/cuda/*.cuh into the package (tokcomp/csrc/cuda/), where the cupy route
    of an installed tokcomp finds them."""
    env = {**os.environ, "TOKCOMP_CUDA": "0"}
    build = [sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)]
    result = subprocess.run(build, capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    shipped = sorted(path.name for path in (tmp_path / "tokcomp" / "csrc" / "cuda").iterdir())
    assert shipped == sorted(path.name for path in (CSRC / "cuda").glob("*.cuh"))
    code = "from tokcomp.ops import cupy_kernels; print(cupy_kernels.kernel_dir())"
    env["PYTHONPATH"] = str(tmp_path)
    command = [sys.executable, "-c", code]
    found = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert found.stdout.strip() == str(tmp_path / "tokcomp" / "csrc" / "cuda"), found.stderr
