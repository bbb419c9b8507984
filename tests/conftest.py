"""Shared test set-up.

Without a GPU, Triton kernels run on the CPU through the interpreter, which must be
switched on before Triton compiles anything, so it is set here, first. With a GPU the
real compiler runs (the GPU tests need it).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import orc_fast  # noqa: E402

# Concrete backends that can run on CPU tensors in this installation (triton: interpreted).
CPU_BACKENDS = orc_fast.available_backends("cpu")


def pytest_report_header(config):
    return f"orc_fast backends on CPU here: {CPU_BACKENDS}; cuda available: {torch.cuda.is_available()}"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def generator(request):
    """A fresh random generator per test; its seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    seed = int(os.environ.get("ORC_FAST_TEST_SEED", seed))
    print(f"{request.node.nodeid}: ORC_FAST_TEST_SEED={seed}")
    gen = torch.Generator().manual_seed(seed)
    return gen
