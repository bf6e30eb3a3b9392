"""Pipeline-parallel training with DeepSpeed.

    deepspeed train_ds.py --config configs/ds_config_pp.yml [--key.sub=value ...]

YAML config -> the family's pipeline layer list (models/) -> DeepSpeed PipelineModule/PipelineEngine, trained
by the loop both trainers share (training/: training.pipeline.PipelineTrainer in training.loop.train).
"""
from __future__ import annotations

import sys

from training.cli import run_cli
from training.pipeline import PipelineTrainer


def main(argv=None) -> int:
    return run_cli(PipelineTrainer(), __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
