"""Triton kernels of orc_fast, installed as orc_fast.kernels."""
