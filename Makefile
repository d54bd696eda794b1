# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs, and trains the tiny model on two local "nodes"
#   make test   installs, brings up the test Slurm cluster, and runs every test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fm9g-installed
PYTEST ?= -q

.PHONY: install demo test unit cluster-up cluster-down bench clean

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

# Unit tests plus the integration tests against the real Slurm cluster in tests/cluster.
test: install cluster-up
	$(PY) -m pytest $(PYTEST)

unit: install
	$(PY) -m pytest $(PYTEST) -m "not cluster"

cluster-up:
	bash tests/cluster/up.sh

cluster-down:
	bash tests/cluster/down.sh

clean:
	rm -rf runs .pytest_cache
