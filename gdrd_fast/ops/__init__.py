"""Custom ops (torch.library) with autograd and backend dispatch, one module per op.

Each op returns per-row losses plus the per-row gradients computed in the same pass (Liger style);
autograd only scales them by grad_output. Kernels: kernels/ (Triton), csrc/ (C++/CUDA), or the
chunked torch code next to the op.
"""
