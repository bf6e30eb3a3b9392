"""Data-parallel training of a whole HF causal LM under DeepSpeed ZeRO (stage 3 by default).

    deepspeed train_ds_zero.py --config configs/ds_config_zero.yml [--key.sub=value ...]

The peer of train_ds.py on the same YAML keys, data order, loss normalisation, metrics, checkpoints and
resume (the shared loop in training/); `model_path` is an HF directory and transformers' own class trains
(training.zero.ZeroTrainer).
"""
from __future__ import annotations

import sys

from training.cli import run_cli
from training.zero import ZeroTrainer


def main(argv=None) -> int:
    return run_cli(ZeroTrainer(), __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
