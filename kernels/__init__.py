"""Triton kernels of gdrd_fast, installed as gdrd_fast.kernels (setup.py's package_dir).

Import `triton` only inside these modules: gdrd_fast must import without it.
"""
