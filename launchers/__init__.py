"""The compute side: everything that runs inside an allocation but is not the trainer.

`node_agent` (with `torchrun`) is the process of each training node job; `convert`,
`infer` and `serve` are the bodies of the post-training jobs that templates/*.sbatch.j2
run with `python -m fm9g.launchers.X`; `prompts` is their pure part (prompt files,
sampling options, `InferenceError`), which the login side imports downward.

Nothing here imports fm9g.orchestrator (tests/test_import_layers.py), and torch,
transformers and vllm are imported only inside the functions that use them.
"""
