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

demo: install
	$(VENV)/bin/fm9g-launch pretrain --config examples/tiny/pretrain.yaml

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
