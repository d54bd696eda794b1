# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs, and trains the tiny model on two local "nodes"
#   make test   installs, lints, brings up the test Slurm cluster, and runs every test
# and two are for the edit-test loop:
#   make unit   the tests that need neither the cluster nor a training run
#   make lint   ruff check + ruff format --check
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUFF   := $(VENV)/bin/ruff
STAMP  := $(VENV)/.fm9g-installed
PYTEST ?= -q

.PHONY: install demo test unit lint cluster-up cluster-down bench clean

# torch==2.13.0 first and pinned exactly: it is the CPU wheel on these machines; a looser
# requirement would pull a several-GB CUDA build.  The project's range admits 2.13.0, so
# the editable install adds nothing to torch.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The demo runs on this machine by definition, even where a Slurm controller answers
# (the config names no executor, and auto would pick Slurm there).
demo: install
	$(VENV)/bin/fm9g-launch pretrain --config examples/tiny/pretrain.yaml --executor local --yes
	@echo "next: . $(VENV)/bin/activate, then the README's 'The first ten minutes' (status, tui, logs, plot, infer, serve)"

# Lint, then every test: unit, slow (real training runs) and `cluster` (the real Slurm
# cluster in tests/cluster).  FM9G_REQUIRE_CLUSTER=1 turns "cluster not up" from a skip
# into an error, so a broken cluster-up cannot pass as a green run.
test: install lint cluster-up
	FM9G_REQUIRE_CLUSTER=1 $(PY) -m pytest $(PYTEST)

# The markers are declared in pyproject.toml and explained in tests/conftest.py.
unit: install
	$(PY) -m pytest $(PYTEST) -m "not cluster and not slow"

lint: install
	$(RUFF) check .
	$(RUFF) format --check .

cluster-up:
	bash tests/cluster/up.sh

cluster-down:
	bash tests/cluster/down.sh

clean:
	rm -rf runs .pytest_cache

# ---- GPU environments (issue 17) -------------------------------------------------------
# Two virtual environments, one per kind of GPU job, because their pins cannot share one:
#   make gpu-train-env   $(GPU_TRAIN_VENV): a CUDA torch, this project, flash-attn, bmtrain
#   make gpu-serve-env   $(GPU_SERVE_VENV): vLLM with the torch it pins, this project
# Point a run's config at them: cluster.train_env and cluster.serve_env.  Run
# gpu-train-env on a GPU node of the kind that will train (srun ... make gpu-train-env):
# both packages compile there, bmtrain's CPU Adam with -march=native for that CPU, and
# BMTrain's CMakeLists hard-codes compute_61..86, so nvcc must be CUDA 12.x (13 dropped
# sm < 75).  flash-attn compiles for $(CUDA_ARCHS) only (80: A100/A800, 90: H100/H200/H20);
# the build takes 15-45 minutes with MAX_JOBS=8.  Neither target has been run yet: no GPU
# machine has been available to this project.
GPU_PYTHON     ?= python3
GPU_TRAIN_VENV ?= .venv-gpu-train
GPU_SERVE_VENV ?= .venv-gpu-serve
GPU_TORCH      ?= torch==2.13.0
# Extra pip options for torch, e.g. --index-url of the PyTorch wheel index for your CUDA
# version; empty: the package index's default CUDA build.
TORCH_INDEX    ?=
CUDA_ARCHS     ?= 80;90
MAX_JOBS       ?= 8
GPU_PIP         = -m pip install --disable-pip-version-check

.PHONY: gpu-train-env gpu-serve-env gpu-check

gpu-train-env:
	test -x $(GPU_TRAIN_VENV)/bin/python || $(GPU_PYTHON) -m venv $(GPU_TRAIN_VENV)
	$(GPU_TRAIN_VENV)/bin/python $(GPU_PIP) '$(GPU_TORCH)' $(TORCH_INDEX)
	$(GPU_TRAIN_VENV)/bin/python $(GPU_PIP) -e . setuptools wheel packaging psutil ninja einops pybind11 'cmake>3.27'
	@# flash-attn's setup.py imports torch, so build isolation would hide it; FORCE_BUILD compiles
	@# here instead of fetching a prebuilt wheel from outside the package index.
	FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS='$(CUDA_ARCHS)' MAX_JOBS=$(MAX_JOBS) \
	  $(GPU_TRAIN_VENV)/bin/python $(GPU_PIP) --no-build-isolation --no-deps 'flash-attn==2.8.3.post2'
	@# bmtrain's setup.py imports torch too.  --no-deps: its nvidia-nccl-cu11 requirement would put an
	@# older libnccl.so.2 over torch's (then `import torch` fails: undefined symbol ncclMemFree); it
	@# builds against torch's own NCCL wheel instead (-DNCCL_VERSION=2: that wheel ships libnccl.so.2 only).
	NCCL_DIR=$$($(GPU_TRAIN_VENV)/bin/python -c 'import nvidia.nccl as n; print(list(n.__path__)[0])') && \
	  NCCL_INCLUDE_DIR=$$NCCL_DIR/include NCCL_LIB_DIR=$$NCCL_DIR/lib CMAKE_ARGS=-DNCCL_VERSION=2 \
	  $(GPU_TRAIN_VENV)/bin/python $(GPU_PIP) --no-build-isolation --no-deps 'bmtrain==1.0.1'
	$(GPU_TRAIN_VENV)/bin/python -c 'import torch, flash_attn, bmtrain; from fm9g.model.attention import probe_flash; \
	  print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), \
	  "flash-attn", flash_attn.__version__, "probe:", probe_flash() or "ok", "bmtrain ok")'

# vLLM 0.32.0 pins torch==2.13.0 (inside this project's range) and needs Python >= 3.11.
gpu-serve-env:
	$(GPU_PYTHON) -c 'import sys; sys.exit("vLLM 0.32 needs Python >= 3.11: set GPU_PYTHON") if sys.version_info < (3, 11) else None'
	test -x $(GPU_SERVE_VENV)/bin/python || $(GPU_PYTHON) -m venv $(GPU_SERVE_VENV)
	$(GPU_SERVE_VENV)/bin/python $(GPU_PIP) -e '.[gpu-serve,hf]'
	$(GPU_SERVE_VENV)/bin/python -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)'

# The one-shot device check (benchmarks/gpu_check.sh); with no CUDA it runs dry and exits 0.
gpu-check: install
	bash benchmarks/gpu_check.sh
