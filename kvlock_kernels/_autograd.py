"""Backward passes for the custom ops by recomputation through their PyTorch paths.

The kernels are forward-only; training code (diffusers' training and gradient
checkpointing tests, a LoRA fine-tune with KV-Lock installed) still needs gradients.
``register_recompute_backward(op, fn)`` gives ``op`` a backward that re-runs ``fn``
(the op's differentiable PyTorch path, same positional arguments, same outputs) under
autograd and returns its input gradients.  It is exact (the PyTorch path is the
reference) but not fused: it costs one more forward in PyTorch, then autograd's
backward of it.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["register_recompute_backward"]


def register_recompute_backward(op, fn: Callable) -> None:
    """Register ``backward`` for a ``torch.library.custom_op`` by recomputing ``fn``.

    ``fn(*args)`` takes the op's arguments positionally (tensors, None, numbers, strings)
    and returns the op's output (a tensor or a tuple of tensors) differentiably.
    Outputs that are not differentiable (an empty placeholder, an int tensor) may
    receive no gradient.
    """

    def setup_context(ctx, inputs, output):
        tensor_pos = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in tensor_pos))
        ctx.tensor_pos = tensor_pos
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in inputs]

    def backward(ctx, *grads):
        args = list(ctx.args)
        wanted = []
        for pos, saved in zip(ctx.tensor_pos, ctx.saved_tensors):
            needs = ctx.needs_input_grad[pos] and saved.is_floating_point()
            args[pos] = saved.detach().requires_grad_(needs)
            if needs:
                wanted.append(pos)
        result = [None] * len(args)
        if not wanted:
            return tuple(result)
        with torch.enable_grad():
            outputs = fn(*args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad and o.numel() > 0]
        if not pairs:
            return tuple(result)
        found = torch.autograd.grad([o for o, _ in pairs], [args[p] for p in wanted],
                                    [g for _, g in pairs], allow_unused=True)
        for pos, g in zip(wanted, found):
            result[pos] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)
