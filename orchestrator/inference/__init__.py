"""The stages after training: `convert` (checkpoint -> HF folder), `infer` (offline batch
generation) and `serve` (an OpenAI-compatible server), each run as a job rendered from
its template, and the pipeline that chains them after a training stage.

Login-side modules (stages, pipeline, prompts) import neither torch nor transformers at
module level; node-side modules (infer_job, serve_node, hf_server, convert_job) do, and
vLLM is only ever imported inside the function that uses it.
"""
