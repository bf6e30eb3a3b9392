"""bf16 gradient accumulation without an fp32 temporary (DeepSpeed's `BF16_Optimizer`, pipeline trainer).

Every micro-batch, `BF16_Optimizer._update_hp_grad` adds each bf16 gradient into its fp32 buffer as
`hp.add_(lp.to(fp32))`: one kernel writes a whole fp32 copy of the gradient (6 bytes per parameter) and a
second reads it back (4 more). `hp.add_(lp)` promotes inside the one kernel and gives the same bits (bf16 ->
fp32 is exact, the fp32 add is the same). Profiled on one H200 (the MoE family's 8x7b width, 2 blocks,
8 micro-batches): the copies took 22 ms of a 566 ms step. `install()` swaps in that one-kernel add; the rest of
the method is DeepSpeed 0.19.8's, and the test suite checks the buffers bit for bit against the original. A
DeepSpeed whose method differs from the one copied keeps its own (training/ds/version.py warns).

`drop_hp_grad(weight)`: the `_hp_grad` this method sets is what DeepSpeed's pipeline engine all-reduces for tied
weights; a frozen weight never gets one.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def _update_hp_grad(self, lp, group_idx, param_idx, clear_lp_grads):
    if lp.grad is None:
        return
    if self.autoep_folding_tp_group is not None and getattr(lp, "ds_grad_is_ready", True):
        from deepspeed.module_inject.auto_ep_folding import apply_folding_correction_to_grad_buffer
        apply_folding_correction_to_grad_buffer(self.autoep_folding_spec, lp, lp.grad,
                                                tp_group=self.autoep_folding_tp_group,
                                                param_name=self.param_names.get(lp))
    hp_grad = self.fp32_groups_gradients[group_idx][param_idx]
    assert hp_grad is not None, \
        f"high precision param has no gradient, lp param_id = {id(lp)} group_info = [{group_idx}][{param_idx}]"
    hp_grad.add_(lp.grad.view(hp_grad.shape))  # dtype promotion inside the kernel: no fp32 copy of lp.grad
    lp._hp_grad = hp_grad
    self.fp32_groups_has_gradients[group_idx][param_idx] = True
    if clear_lp_grads:
        lp.grad.zero_()


ORIGINAL = None
QUALIFIED = "deepspeed.runtime.bf16_optimizer:BF16_Optimizer._update_hp_grad"  # a key of version.COPIED


def install() -> None:
    """Replace `BF16_Optimizer._update_hp_grad` (idempotent), unless DeepSpeed's differs from the copied one."""
    global ORIGINAL
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from training.ds.version import copy_is_current

    if BF16_Optimizer._update_hp_grad is not _update_hp_grad and copy_is_current(QUALIFIED):
        ORIGINAL = BF16_Optimizer._update_hp_grad
        _update_hp_grad.patched_over = ORIGINAL  # what version.py compares with the copy it was made from
        BF16_Optimizer._update_hp_grad = _update_hp_grad


def drop_hp_grad(weight) -> None:
    """Mark `weight` as having no fp32 gradient for the pipeline engine's tied-weight all-reduce."""
    weight._hp_grad = None
