"""Mixtures of experts on fake tensors.

transformers 5 runs a model's experts through ``grouped_mm`` (``experts_implementation`` defaults
to ``"grouped_mm"``, transformers/integrations/moe.py): the tokens are sorted by expert and every
tensor has the shape tokens x top-k, whatever the router chose. The routing changes only the values
(the offsets), so the memory of the step does not depend on it and fake tensors can run it.

One gap: torch's meta kernel for ``grouped_mm`` accepts bf16 only, while the CPU kernel also runs
fp32 (full fine-tuning in fp32; QLoRA's unquantized experts, which peft casts to fp32). For those,
:class:`_FakeGroupedMM` allocates what the native op allocates: its output, and for backward it
keeps only what the native autograd keeps (the weight when the input needs a gradient, the input
when the weight does; checked on the real op in tests/test_simulate.py). Its values are not a
product, so it is only installed inside a simulation.
"""

from __future__ import annotations


def routing_independent() -> bool:
    """Whether the installed transformers runs experts as grouped matmuls (static shapes)."""
    try:
        from transformers.integrations import moe
    except ImportError:
        return False
    return hasattr(moe, "grouped_mm_experts_forward") and hasattr(moe, "_grouped_mm")


def _fake_grouped_mm_function():
    import torch

    class _FakeGroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, offs):
            need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            ctx.save_for_backward(b if need_a else None, a if need_b else None)
            ctx.b_shape = b.shape
            return a.new_empty(a.shape[0], b.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            b, a = ctx.saved_tensors
            grad_a = grad.new_empty(grad.shape[0], b.shape[-2]) if b is not None else None
            grad_b = grad.new_empty(ctx.b_shape) if a is not None else None
            return grad_a, grad_b, None

    return _FakeGroupedMM


class GroupedExperts:
    """While simulating: ``grouped_mm`` of non-bf16 operands goes through :class:`_FakeGroupedMM`."""

    def __enter__(self):
        if not routing_independent():
            self.moe = None
            return self
        import torch
        from transformers.integrations import moe

        self.moe, self.orig = moe, moe._grouped_mm
        fake, orig = _fake_grouped_mm_function(), moe._grouped_mm

        def grouped_mm(input, weight, offs):
            if weight.dtype == torch.bfloat16:
                return orig(input, weight, offs)
            return fake.apply(input.to(weight.dtype), weight, offs)

        moe._grouped_mm = grouped_mm
        return self

    def __exit__(self, *exc):
        if self.moe is not None:
            self.moe._grouped_mm = self.orig
        return False
