"""FM9G models and training.

args        ModelArgs, load_model_config(name_or_path, **overrides)
dragonfly   Dragonfly (the 2B/8B architecture), build_model, count_parameters
attention   SdpaAttention, FlashAttention, select_attention, set_attention, probe_flash
schedules   Cosine, WarmupStableDrop, WarmupStableExp, build_scheduler
optim       build_optimizer (AdamW, muP groups)
checkpoint  Checkpointer (the FM9G checkpoint layout)
backends    TorchBackend (DDP/FSDP2), BMTrainBackend; memory: per-GPU bytes of each layout
train       Trainer, run(run_dir), main()  -- `python -m fm9g.model.train --run-dir RUN`
hf, convert to_hf/from_hf, export_hf/import_hf, convert(run_dir, step, output)
"""
