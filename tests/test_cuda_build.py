"""The CUDA sources (csrc/cuda/*.cu) compile wherever nvcc exists (docs/design.md §7).

No GPU is needed. When the installed orc_fast._C is at least as new as the sources and
carries the CUDA kernel, the build that produced it is the proof; otherwise the sources
are compiled here with nvcc (object files only, in a temporary folder) and any compiler
error fails the test.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc() -> str | None:
    """The nvcc that setup.py would use (CUDA_HOME first: a PATH nvcc may be a wrapper)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for candidate in ([os.path.join(home, "bin", "nvcc")] if home else []) + ["/usr/local/cuda/bin/nvcc"]:
        if os.path.exists(candidate):
            return candidate
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None or torch.version.cuda is None or os.environ.get("ORC_FAST_NO_CUDA") == "1",
    reason="nvcc and a CUDA build of torch are needed to build the CUDA sources",
)


def _extension_path() -> str | None:
    try:
        from orc_fast import _C
    except ImportError:
        return None
    return _C.__file__


def _has_cuda_kernel() -> bool:
    if _extension_path() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("orc_fast::group_kd_fused", "CUDA")


def _extension_is_fresh() -> bool:
    path = _extension_path()
    if path is None:
        return False
    inputs = CUDA_SOURCES + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh"))
    inputs += glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "*.h"))
    return all(os.path.getmtime(path) >= os.path.getmtime(source) for source in inputs)


def _nvcc_command(source: str, output: str, arch: str) -> list[str]:
    from torch.utils import cpp_extension

    cuda_home = os.path.dirname(os.path.dirname(NVCC))
    includes = [os.path.join(torch.utils.cpp_extension._TORCH_PATH, "include"),
                os.path.join(torch.utils.cpp_extension._TORCH_PATH, "include", "torch", "csrc", "api", "include"),
                os.path.join(cuda_home, "include"), sysconfig.get_paths()["include"]]
    return [
        NVCC, "-c", source, "-o", output, *[f"-I{path}" for path in includes],
        *cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC",
        "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
    ]


@needs_nvcc
def test_cuda_sources_exist():
    assert CUDA_SOURCES, "csrc/cuda/ holds no .cu file"


@needs_nvcc
def test_cuda_sources_compile(tmp_path):
    if _has_cuda_kernel() and _extension_is_fresh():
        return  # orc_fast._C was built from these very sources, CUDA kernel included
    for source in CUDA_SOURCES:
        output = str(tmp_path / (os.path.basename(source) + ".o"))
        done = subprocess.run(_nvcc_command(source, output, "90"), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"nvcc failed on {os.path.relpath(source, ROOT)}:\n{done.stderr[-6000:]}"
        assert os.path.getsize(output) > 0


@needs_nvcc
def test_installed_extension_registers_the_cuda_kernel():
    """setup.py builds the CUDA sources into orc_fast._C whenever nvcc is present."""
    if not _extension_is_fresh():
        pytest.skip("orc_fast._C is older than csrc/: rebuild it (make setup) to check its registrations")
    assert _has_cuda_kernel(), (
        "orc_fast._C was built with nvcc present but has no CUDA kernel for orc_fast::group_kd_fused: "
        "the CUDA sources failed to build (setup.py keeps going without them)"
    )
