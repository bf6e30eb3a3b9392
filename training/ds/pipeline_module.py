"""DeepSpeed's PipelineModule with the stage boundaries we computed (training/partition.py), and the accessors
for the private state of a PipelineModule that the pipeline trainer reads."""
from __future__ import annotations

from deepspeed.pipe import PipelineModule


class PartitionedPipelineModule(PipelineModule):
    """A PipelineModule whose stage boundaries are given, instead of computed by DeepSpeed."""

    def __init__(self, layers, bounds: list[int], **kwargs):
        self._given_bounds = list(bounds)
        super().__init__(layers=layers, partition_method="uniform", **kwargs)

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._given_bounds)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    def _get_frozen_parameter_names(self, layer):
        """The state_dict keys `save_checkpoint(exclude_frozen_parameters=True)` leaves out: every key that is not
        a trained tensor. DeepSpeed's own version lists frozen parameter names, which a layer whose state_dict
        renames its parameters (stacked MoE experts written per expert) does not have as keys (KeyError)."""
        from models.lora import lora_state_dict

        kept = lora_state_dict(layer)
        return [key for key in layer.state_dict() if key not in kept]


def local_start(module: PipelineModule) -> int:
    """The global spec index of this stage's first layer."""
    return module._local_start


def layer_specs(module: PipelineModule) -> list:
    """Every stage's layer specs, in order (the list the module was built from)."""
    return module._layer_specs
