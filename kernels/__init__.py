"""Triton kernels of orc_fast, installed as orc_fast.kernels."""

from .group_kd import group_kd_triton

__all__ = ["group_kd_triton"]
