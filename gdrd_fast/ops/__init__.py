"""Custom ops (torch.library) with autograd and backend dispatch, one module per op.

Each module holds the op's one backend table (IMPLS, a gdrd_fast.backends.Op): what each backend runs,
computes and takes; the custom op indexes that table, and its autograd.Function twin runs the same kernel
in eager mode (docs/design/index.md).

Each op returns per-row losses plus the per-row gradients computed in the same pass (Liger style);
autograd only scales them by grad_output. Kernels: kernels/ (Triton), csrc/ (C++/CUDA), or the
chunked torch code next to the op.
"""
