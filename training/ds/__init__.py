"""Every DeepSpeed patch and every access to a DeepSpeed private name lives in this package (the installed
DeepSpeed is checked once, by training.cli before the config: training/ds/version.py:check_installed).

  version.py          the one version check: the internals below exist (refused if not), 0.19.x (warned if not)
  engine.py           EngineView: what the loop and the checkpoint code ask of a trainer's engine
  bf16_grads.py       BF16_Optimizer._update_hp_grad without an fp32 temporary (a copied method); drop_hp_grad
  pipeline_module.py  PartitionedPipelineModule (our stage bounds, trained-only checkpoints); local_start,
                      layer_specs
  safe_load.py        weights_only loads for DeepSpeed's load_checkpoint (its checkpoint engine, torch.load)
"""
from training.ds.version import DeepSpeedVersionError, check_installed

__all__ = ["DeepSpeedVersionError", "check_installed"]
