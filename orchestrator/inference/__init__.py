"""The stages after training, login side: `convert` (checkpoint -> HF folder), `infer`
(offline batch generation) and `serve` (an OpenAI-compatible server), each run as a job
rendered from its template, and the pipeline that chains them after a training stage.

What those jobs run lives node side, in fm9g.launchers (convert, infer, serve, prompts);
the modules here import neither torch nor transformers at module level.
"""
