"""Triton kernels on CPU tensors: the interpreter must be on before triton (and gdrd_fast.kernels) import.

These files run in their own process (tests/test_triton_interpreter.py): a process either interprets
Triton kernels or compiles them, and the static checks need them compiled.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: shared cases
