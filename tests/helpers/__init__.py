"""Helpers shared by the tests (and the benchmarks), one copy each:

- `cluster`: is the test Slurm cluster up? (the root conftest skips `cluster` tests when not)
- `runs`: launch a tiny run through the CLI, wait for something, read a run's metrics,
  jobs and state.db events back
- `faults`: fault injections on the test cluster
- `scontrol`: the `scontrol show job` / `scontrol requeue` client the live Slurm tests use

Import them as `tests.helpers.<module>` (pyproject.toml puts the repository root on
pytest's `pythonpath`; the benchmarks add it to `sys.path` themselves).
"""
