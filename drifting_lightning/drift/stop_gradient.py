"""The loss MSE(gen / s_in, sg(gen / s_in + F)) as an autograd function of its value and gradient alone."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class StopGradientMSE(torch.autograd.Function):
    """MSE(gen / s_in, sg(gen / s_in + F)) from its value and F alone (PAPER.md 1: the stop-gradient loss).

    forward(gen, value, gradient) returns the precomputed value; ``gradient`` is the force buffer written as
    -2 F / (s_in numel), the gradient for an incoming gradient of 1. backward returns it times the incoming gradient
    in gen's dtype and strides. For float32 gen it returns the buffer itself (scaled in place unless the incoming
    gradient is 1): F is dead once the gradient exists, and autograd adopts the buffer as gen.grad (same dtype and
    strides), so the loss holds no memory the gradient would not need anyway. The price: one backward per loss; a
    second one (retain_graph=True) raises instead of reading a spent buffer.
    """

    @staticmethod
    def forward(ctx, gen: Tensor, value: Tensor, gradient: Tensor) -> Tensor:
        ctx.save_for_backward(gradient)
        ctx.gen_dtype = gen.dtype
        ctx.spent = False
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.spent:
            raise RuntimeError(
                "DriftingLoss supports one backward per loss: the first turned its force buffer into the gradient "
                "in place. Compute the loss again instead of backward(retain_graph=True) twice."
            )
        ctx.spent = True
        (gradient,) = ctx.saved_tensors
        if gradient.dtype == ctx.gen_dtype:
            unit = grad_output.device.type == "cpu" and bool(grad_output == 1)  # no host sync on a GPU
            return (gradient if unit else gradient.mul_(grad_output)), None, None
        grad = torch.empty_like(gradient, dtype=ctx.gen_dtype)
        torch.mul(gradient, grad_output, out=grad)  # computed in float32, rounded once into gen's dtype
        return grad, None, None
