"""The NaN / inf policy of the README's Guarantees section, on every CPU-runnable backend.

A NaN or +inf logit in a row makes that row's loss (and gradient) NaN, never a finite
wrong number, and leaves every other row exactly as it would be without it.
"""

import math

import pytest
import torch
from conftest import CPU_BACKENDS
from kd_check import make_logits, make_target

from orc_fast import group_kd


def _per_row(backend, student, teachers, target):
    leaf = student.clone().requires_grad_(True)
    result = group_kd(leaf, teachers, target, backend=backend, reduction="none")
    result.loss.sum().backward()
    return result.loss.detach(), leaf.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_bad_logit_poisons_its_row_only(generator, backend, bad_value, where):
    student = make_logits((2, 6, 300), generator)
    teachers = make_logits((3, 6, 300), generator)
    target = make_target(6, 300, generator)
    clean_loss, clean_grad = _per_row(backend, student, teachers, target)
    row = 3
    if where == "student":
        student[1, row, 17] = bad_value
    else:
        teachers[2, row, 250] = bad_value
    loss, grad = _per_row(backend, student, teachers, target)

    # a bad student logit spoils that student's row; a bad teacher logit spoils p̄ for
    # the row, hence every student's row
    spoiled = torch.zeros_like(loss, dtype=torch.bool)
    if where == "student":
        spoiled[1, row] = True
    else:
        spoiled[:, row] = True
    assert torch.isnan(loss[spoiled]).all(), f"row loss must be NaN, got {loss[spoiled]}"
    assert torch.isnan(grad[spoiled]).all(), "the spoiled row's gradient must be NaN"
    torch.testing.assert_close(loss[~spoiled], clean_loss[~spoiled], rtol=0, atol=0)
    torch.testing.assert_close(grad[~spoiled], clean_grad[~spoiled], rtol=0, atol=0)
    mean = group_kd(student, teachers, target, backend=backend).loss
    assert torch.isnan(mean), "a reduced loss over a NaN row is NaN"
