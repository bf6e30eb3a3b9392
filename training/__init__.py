"""The training loop both trainers share: `deepspeed train_ds.py` (pipeline) and `deepspeed train_ds_zero.py`
(ZeRO over the HF model). One config, one plan, one step loop; a small strategy per engine.

    cli.py          arguments + config in, exit code out (user errors, bad steps, preemption)
    launch.py       `python -m training.launch`: DeepSpeed's runner, non-zero exit whenever the ranks stopped early
    distributed.py  process group, device, all-reduce helpers
    setup.py        everything checked before the first collective (`plan_run` -> Plan)
    checkpoints.py  choose / verify / load the checkpoint to resume from; save one (manifest, COMPLETE)
    loop.py         the step loop: progress, metrics, bad-step guard, periodic save, stop on signal
    pipeline.py     PipelineTrainer: DeepSpeed PipelineModule/PipelineEngine over models/' layers
    zero.py         ZeroTrainer: transformers' own model under DeepSpeed ZeRO
"""
