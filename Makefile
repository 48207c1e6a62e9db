# Set-up and everyday commands. `make run` and `make test` do all the set-up on a fresh machine.
# torch is pinned to the 2.13.0 CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
# On a GPU machine, install a CUDA build of torch first (TORCH_SPEC="torch==2.13.0 --index-url ...").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Two installs: the light one `make run` needs (torch, the package and its few dependencies), and
# the full one `make test` needs (every extra, and the Debian packages below).
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install -q --disable-pip-version-check
# DeepSpeed compiles its CPU communication op on first use (g++, Python headers) and caches it here.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# Debian packages and the commands that show they are installed.
SYSTEM_PACKAGES := openmpi-bin libopenmpi-dev prometheus g++ python3-dev buildah debootstrap
SYSTEM_COMMANDS := mpirun mpicc prometheus promtool g++ python3-config buildah debootstrap

.PHONY: run test lint bench clean system-packages

# Open MPI (mpirun, mpi4py), Prometheus (the server and promtool, for the observability tests) and a
# C++ compiler (DeepSpeed's op), buildah and debootstrap (tests/test_docker.py builds the CPU image
# without a Docker engine) from Debian's packages, installed once when a command is missing (needs root).
system-packages:
	@missing=0; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  echo "installing $(SYSTEM_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(SYSTEM_PACKAGES); fi

# The quickstart's install: the package and the plot extra (matplotlib, for its figure), no other
# extra, no Debian packages (DeepSpeed, mpi4py, transformers, Pillow, datasets and tensorboard are the
# extras deepspeed, mpi, hf, images, datasets and tensorboard: pip install -e '.[deepspeed]'). Redone
# when this file changes, so that a venv made by an older rule gets what `run` now needs.
$(RUN_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_SPEC)
	$(PIP) -e '.[plot]'
	touch $(RUN_STAMP)

# Everything the tests use: every extra, and the Debian packages (mpi4py builds against Open MPI).
$(STAMP): pyproject.toml | system-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_SPEC)
	$(PIP) -e '.[dev,bench,hf,deepspeed,mpi,images,datasets,tensorboard]'
	touch $(STAMP) $(RUN_STAMP)

# The 2-rank CPU quickstart (torchrun, gloo), started afresh each time; its run record (job.yaml,
# metrics.jsonl), checkpoints and figure (report.png) in runs/quickstart. The last run's checkpoints
# go first: checkpoint.keep keeps the highest steps, so the new run would prune its own early ones.
run: $(RUN_STAMP)
	rm -f runs/quickstart/step-*.pt
	$(VENV)/bin/ngd-dist launch configs/quickstart.yaml --launcher torchrun --nproc 2 --set checkpoint.resume=never
	$(VENV)/bin/ngd-dist report runs/quickstart --out runs/quickstart/report.png

lint: $(STAMP)
	$(VENV)/bin/ruff check ngd_dist tests benchmarks
	$(VENV)/bin/mypy ngd_dist
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) benchmarks/core_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info .cache/torch_extensions .cache/docker
