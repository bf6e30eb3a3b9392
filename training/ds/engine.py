"""What the step loop and the checkpoint code ask of either trainer's DeepSpeed engine, and nothing else.

`trainer.engine_view` is an `EngineView` over the engine `deepspeed.initialize` made (PipelineEngine or
DeepSpeedEngine); the loop reads this step's learning rate and the precision from it, training/checkpoints.py
saves and loads through it (loads always with weights_only=True, training/ds/safe_load.py).
"""
from __future__ import annotations


class EngineView:
    def __init__(self, engine):
        self._engine = engine

    def lr(self) -> float:
        """The first parameter group's learning rate: this step's until the optimizer steps (DeepSpeed steps
        the scheduler after the optimizer)."""
        return self._engine.get_lr()[0]

    @property
    def precision(self) -> str:
        """'fp16', 'bf16' or 'fp32': the engine's training precision."""
        if self._engine.fp16_enabled():
            return "fp16"
        return "bf16" if self._engine.bfloat16_enabled() else "fp32"

    @property
    def fp16(self) -> bool:
        """fp16's loss scaler skips a step whose gradients overflowed by itself (and lowers the scale): such a
        step is no bad step."""
        return self.precision == "fp16"

    def save_checkpoint(self, save_dir: str, **kwargs) -> None:
        """DeepSpeed's files of checkpoint `tag` (every rank writes its part)."""
        self._engine.save_checkpoint(save_dir, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs):
        """DeepSpeed's `load_checkpoint` with every file unpickled by `torch.load(weights_only=True)`."""
        from training.ds import safe_load

        return safe_load.load_checkpoint(self._engine, load_dir, tag, **kwargs)
