"""The build itself: where the C++ extension is expected, it must be there.

`make setup` builds with ORC_FAST_REQUIRE_EXTENSION=1, so a compile error fails the
build; this test catches the other way to end up without the extension (an install that
fell back to the reference backend), which would otherwise only show as skipped cpu tests.
"""

import platform
import sys

import pytest
import torch

import orc_fast
from orc_fast import ops

x86_64_linux = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


@pytest.mark.skipif(not x86_64_linux, reason="the C++ CPU kernel is only required on x86-64 Linux")
def test_cpu_backend_is_built():
    assert ops.EXTENSION_MISSING is None, ops.EXTENSION_MISSING
    assert "cpu" in orc_fast.available_backends("cpu")
    # both C++ ops come from the one TORCH_LIBRARY block in csrc/group_kd.cpp
    assert torch._C._dispatch_has_kernel_for_dispatch_key("orc_fast::group_kd_fused", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("orc_fast::group_kd_scale_grad", "CPU")
