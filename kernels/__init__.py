"""Triton kernels, installed as fastserve.kernels."""
