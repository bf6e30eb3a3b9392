"""What the step loop and the checkpoint code ask of either trainer's DeepSpeed engine, and nothing else.

`trainer.engine_view` is an `EngineView` over the engine `deepspeed.initialize` made (PipelineEngine or
DeepSpeedEngine); the loop reads this step's learning rate from it (the precision is `TrainConfig.precision`),
training/checkpoints.py saves and loads through it (loads always with weights_only=True, training/ds/safe_load.py).
"""
from __future__ import annotations


class EngineView:
    def __init__(self, engine):
        self._engine = engine

    def lr(self) -> float:
        """The first parameter group's learning rate: this step's until the optimizer steps (DeepSpeed steps
        the scheduler after the optimizer)."""
        return self._engine.get_lr()[0]

    def save_checkpoint(self, save_dir: str, **kwargs) -> None:
        """DeepSpeed's files of checkpoint `tag` (every rank writes its part)."""
        self._engine.save_checkpoint(save_dir, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs):
        """DeepSpeed's `load_checkpoint` with every file unpickled by `torch.load(weights_only=True)`."""
        from training.ds import safe_load

        return safe_load.load_checkpoint(self._engine, load_dir, tag, **kwargs)
