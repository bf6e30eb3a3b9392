"""Benchmark harness: pipeline (train_ds.py) vs ZeRO-3 (train_ds_zero.py); see benchmarks/README.md."""
