"""The CUDA kernel's logic, checked on the CPU against the float64 specification.

csrc/cuda/group_kd_cuda_kernel.cuh is compiled with g++ through tests/cuda_emulator/
emulate.cpp (every CUDA thread an OS thread, barriers for __syncthreads/__syncwarp and
the warp shuffles, NaN-filled shared memory) and run on small shapes for each thread
group (a warp, blocks of 64 threads -- cheap to emulate, the same code as the GPU's 256
and 512 -- and of 256 and 512), scalar and 16-byte-vector paths, fp32/fp16/
bf16, every error rule, more students than one register tile, strided rows and the
special values (ignore_index, -inf classes, ±1e4, NaN/inf rows, out-of-range targets).
The sm_90 cluster kernel (a row split over the blocks of a thread-block cluster, which
swap statistics through distributed shared memory) runs with its blocks together. It
checks logic, not the GPU's fast-math rounding or timing: tests/test_gpu_kernels.py does
that on a GPU.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

from orc_fast.reference import group_kd_math

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = -100
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NAMES = ("loss", "kl", "ce", "student_correct", "teacher_correct", "error_mask", "grad")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the CUDA kernel for the CPU")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    library = str(tmp_path_factory.mktemp("cuda_emulator") / "emulate.so")
    command = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing", "-Wall",
               "-Wno-unknown-pragmas", "-I", os.path.join(ROOT, "csrc", "cuda"),
               os.path.join(ROOT, "tests", "cuda_emulator", "emulate.cpp"), "-o", library]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the CUDA kernel does not build for the CPU emulator:\n{done.stderr[-6000:]}"
    lib = ctypes.CDLL(library)
    lib.run_group_kd.restype = ctypes.c_int
    return lib


def _launch(lib, student, teachers, target, weights, alpha, members, temperature, rule, group, vectorised,
            cluster_size=0):
    S, B, C = student.shape
    G = teachers.shape[0]
    outputs = dict(
        loss=torch.full((S, B), math.nan), kl=torch.full((S, B), math.nan), ce=torch.full((S, B), math.nan),
        student_correct=torch.ones((S, B), dtype=torch.bool), teacher_correct=torch.ones((G, B), dtype=torch.bool),
        error_mask=torch.ones((B,), dtype=torch.bool), grad=torch.full((S, B, C), math.nan, dtype=student.dtype),
    )
    target, weights, alpha, members = (t.contiguous() for t in (target, weights, alpha, members))
    p = ctypes.c_void_p
    i64 = ctypes.c_int64
    status = lib.run_group_kd(
        p(student.data_ptr()), i64(student.stride(0)), i64(student.stride(1)),
        p(teachers.data_ptr()), i64(teachers.stride(0)), i64(teachers.stride(1)),
        p(target.data_ptr()), p(weights.data_ptr()), p(alpha.data_ptr()), p(members.data_ptr()),
        ctypes.c_float(temperature), i64(IGNORE), ctypes.c_int(rule),
        ctypes.c_int(S), ctypes.c_int(G), ctypes.c_int(C), i64(B),
        *(p(outputs[name].data_ptr()) for name in NAMES),
        ctypes.c_int(DTYPES[student.dtype]), ctypes.c_int(group), ctypes.c_int(int(vectorised)),
        ctypes.c_int(cluster_size),
    )
    assert status == 0
    return outputs


def _aligned(*tensors) -> bool:
    """What the host code checks before it picks 16-byte vectors."""
    for tensor in tensors:
        size = tensor.element_size()
        if tensor.data_ptr() % 16:
            return False
        for dim in (0, 1):
            if tensor.size(dim) != 1 and (tensor.stride(dim) * size) % 16:
                return False
    return True


def _inputs(gen, S, G, B, C, dtype, scale=3.0, ignore_fraction=0.25):
    student = (torch.randn(S, B, C, generator=gen) * scale).to(dtype)
    teachers = (torch.randn(G, B, C, generator=gen) * scale).to(dtype)
    target = torch.randint(0, C, (B,), generator=gen)
    target[torch.rand(B, generator=gen) < ignore_fraction] = IGNORE
    weights = torch.rand(G, generator=gen) + 0.1
    weights /= weights.sum()
    alpha = torch.rand(S, generator=gen)
    members = (torch.rand(S, generator=gen) < 0.7).float()
    members[0] = 1.0
    return student, teachers, target, weights, alpha, members


def _truth(student, teachers, target, weights, alpha, members, temperature, rule):
    student64 = student.detach().double().requires_grad_(True)
    loss, kl, ce, sc, tc, err = group_kd_math(student64, teachers.double(), target, weights.double(), alpha.double(),
                                              members, temperature, IGNORE, rule)
    (grad,) = torch.autograd.grad(loss.sum(), student64)
    return dict(loss=loss.detach(), kl=kl.detach(), ce=ce.detach(), student_correct=sc, teacher_correct=tc,
                error_mask=err, grad=grad)


def _check(got, want, dtype):
    for name in ("loss", "kl", "ce"):
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-5, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name in ("student_correct", "teacher_correct", "error_mask"):
        assert torch.equal(got[name], want[name]), f"{name}: {got[name]} != {want[name]}"
    loose = dtype != torch.float32
    finite = want["grad"][torch.isfinite(want["grad"])]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(got["grad"].double(), want["grad"], rtol=1e-2 if loose else 1e-5,
                               atol=(1e-2 if loose else 1e-6) * max(scale, 1e-3), equal_nan=True,
                               msg=lambda m: f"grad: {m}")


def _case(emulator, gen, S, G, B, C, dtype, group, temperature=4.0, rule=0, vectorise=True, cluster_size=0):
    inputs = _inputs(gen, S, G, B, C, dtype)
    vectorised = vectorise and _aligned(inputs[0], inputs[1], torch.empty(S, B, C, dtype=dtype))
    got = _launch(emulator, *inputs, temperature, rule, group, vectorised, cluster_size)
    _check(got, _truth(*inputs, temperature, rule), dtype)
    return vectorised


# (S, G, B, C, dtype, group, temperature, rule): each group size with both the scalar and
# the 16-byte path, odd C (a scalar tail), several student tiles, every rule.
CASES = [
    (1, 1, 9, 1, torch.float32, 32, 4.0, 0),
    (2, 3, 11, 3, torch.float32, 32, 2.0, 1),
    (3, 2, 10, 100, torch.float32, 32, 4.0, 2),
    (2, 2, 9, 104, torch.bfloat16, 32, 1.0, 3),
    (6, 2, 9, 40, torch.float16, 32, 4.0, 3),
    (2, 2, 3, 1000, torch.float32, 64, 4.0, 0),
    (1, 4, 3, 1024, torch.bfloat16, 256, 2.0, 3),
    (5, 3, 2, 333, torch.float16, 64, 4.0, 2),
    (2, 1, 2, 4097, torch.float32, 512, 4.0, 1),
    (1, 2, 2, 4096, torch.bfloat16, 64, 4.0, 0),
]


@pytest.mark.parametrize("S,G,B,C,dtype,group,temperature,rule", CASES)
@pytest.mark.parametrize("vectorise", [True, False], ids=["vector", "scalar"])
def test_matches_float64(emulator, generator, S, G, B, C, dtype, group, temperature, rule, vectorise):
    _case(emulator, generator, S, G, B, C, dtype, group, temperature, rule, vectorise)


# The cluster kernel (sm_90, large rows): a row split over 2..4 blocks, slices that are
# uneven, a block with no vector at all, the scalar tail on the last block.
SPLIT_CASES = [
    (1, 4, 3, 1000, torch.bfloat16, 256, 4.0, 0, 2),
    (2, 2, 3, 4097, torch.float32, 64, 2.0, 3, 3),
    (6, 3, 2, 777, torch.float16, 64, 4.0, 3, 4),
    (3, 1, 2, 2048, torch.float32, 512, 1.0, 2, 2),
    (1, 1, 3, 9, torch.float32, 64, 4.0, 1, 4),
]


@pytest.mark.parametrize("S,G,B,C,dtype,group,temperature,rule,cluster_size", SPLIT_CASES)
@pytest.mark.parametrize("vectorise", [True, False], ids=["vector", "scalar"])
def test_cluster_split_matches_float64(emulator, generator, S, G, B, C, dtype, group, temperature, rule,
                                       cluster_size, vectorise):
    _case(emulator, generator, S, G, B, C, dtype, group, temperature, rule, vectorise, cluster_size)


def test_vector_path_is_exercised(emulator, generator):
    assert _case(emulator, generator, 2, 2, 4, 64, torch.bfloat16, 32)
    assert _case(emulator, generator, 1, 2, 2, 2048, torch.float32, 64)


@pytest.mark.parametrize("group,cluster_size", [(32, 0), (64, 0), (64, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vectors_with_a_scalar_tail(emulator, generator, group, cluster_size, dtype):
    """Aligned rows whose C is no multiple of the vector: vectors, then a scalar tail."""
    G, C = 2, 1001
    student = (torch.randn(1, 1, C, generator=generator) * 3).to(dtype)
    teachers = (torch.randn(G, 1, 1008, generator=generator) * 3).to(dtype)[..., :C]  # padded rows
    target = torch.tensor([C - 1])  # in the tail
    inputs = (student, teachers, target, torch.full((G,), 1 / G), torch.tensor([0.4]), torch.ones(1))
    assert _aligned(student, teachers, torch.empty(1, 1, C, dtype=dtype))
    for rule in (0, 3):
        got = _launch(emulator, *inputs, 2.0, rule, group, True, cluster_size)
        _check(got, _truth(*inputs, 2.0, rule), dtype)


@pytest.mark.parametrize("group", [32, 64])
def test_strided_rows(emulator, generator, group):
    S, G, B, C = 2, 3, 5, 37
    student = (torch.randn(B, S, C + 9, generator=generator) * 3).transpose(0, 1)[..., 2:C + 2]
    teachers = (torch.randn(G, 2 * B, C, generator=generator) * 3)[:, ::2]
    target = torch.randint(0, C, (B,), generator=generator)
    inputs = (student, teachers, target, torch.full((G,), 1 / G), torch.tensor([0.3, 0.9]), torch.ones(S))
    got = _launch(emulator, *inputs, 4.0, 0, group, False)
    _check(got, _truth(*inputs, 4.0, 0), torch.float32)


@pytest.mark.parametrize("group,C,cluster_size", [(32, 64, 0), (64, 1024, 0), (64, 1024, 3)])
def test_special_values(emulator, generator, group, C, cluster_size):
    S, G, B = 2, 2, 10
    student, teachers, target, weights, alpha, members = _inputs(generator, S, G, B, C, torch.float32,
                                                                 ignore_fraction=0)
    extreme = torch.rand(student.shape, generator=generator) < 0.1
    student = torch.where(extreme, torch.sign(student) * 1e4, student)
    dead = torch.rand(B, C, generator=generator) < 0.2
    dead[torch.arange(B), target] = False
    student[:, dead] = -math.inf
    teachers[:, dead] = -math.inf
    target[0] = IGNORE
    student[1, 0, 5] = math.nan  # an ignored row is never read
    inputs = (student, teachers, target, weights, alpha, members)
    clean = _launch(emulator, *inputs, 4.0, 0, group, True, cluster_size)
    student[1, 0, 5] = 0.0
    _check(clean, _truth(*inputs, 4.0, 0), torch.float32)
    assert torch.isfinite(clean["loss"]).all() and (clean["grad"][:, 0] == 0).all()

    student[1, 2, C // 2] = math.nan
    student[0, 3, C // 3] = math.inf
    teachers[1, 5, C - 1] = math.nan
    target[7], target[8] = C, -3
    got = _launch(emulator, student, teachers, target, weights, alpha, members, 4.0, 0, group, True, cluster_size)
    spoiled = torch.zeros(S, B, dtype=torch.bool)
    spoiled[1, 2] = spoiled[0, 3] = True
    spoiled[:, 5] = spoiled[:, 7] = spoiled[:, 8] = True
    for name in ("loss", "grad"):
        assert torch.isnan(got[name][spoiled]).all(), name
        assert torch.equal(got[name][~spoiled], clean[name][~spoiled]), f"{name}: other rows changed"
    for name in ("kl", "ce"):
        assert torch.isnan(got[name][:, 7:9]).all(), f"{name} of out-of-range targets"
    assert not got["student_correct"][:, 7:9].any()


def test_nan_and_tie_argmax_follow_torch(emulator, generator):
    S, G, B, C = 1, 1, 4, 40
    student = torch.randn(S, B, C, generator=generator)
    student[0, 0, 25] = math.nan
    student[0, 1, 3] = math.inf
    student[0, 1, 20] = math.nan  # NaN beats an earlier +inf
    student[0, 2, 10] = student[0, 2, 30] = 50.0  # a tie: the first index
    student[0, 3, 0] = student[0, 3, 39] = 50.0
    target = student[0].argmax(-1)
    for group, cluster_size in ((32, 0), (64, 0), (64, 3)):
        got = _launch(emulator, student, student.clone(), target, torch.ones(G), torch.full((S,), 0.5), torch.ones(S),
                      4.0, 0, group, False, cluster_size)
        assert got["student_correct"].all() and got["teacher_correct"].all()
