# itdiffusion: one-command setup, tests, smoke run, reproduction and benchmarks.
# Every target depends on `setup`, so a fresh clone needs no other step.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: setup test test-slow test-slurm test-package lint smoke smoke-ddpm reproduce bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

# Two workers (pytest-xdist; tests use their own tmp folders and free ports): PYTEST_ARGS="-n 0" for one process.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not slurm" -n 2 $(PYTEST_ARGS)

# runs `make smoke` first when its base model is missing (the dataset budget's promise on the smoke U-Net)
test-slow: $(STAMP)
	@ls checkpoints/finetune/smoke-*-base/model.pt >/dev/null 2>&1 || $(MAKE) smoke
	$(PY) -m pytest -q -m "slow and not slurm" $(PYTEST_ARGS)

# On a local single-node SLURM that scripts/local_slurm.sh installs (apt: slurm-wlm, munge) and starts (root):
# the sbatch template, its time-limit requeue and resubmission, srun -n2 and submitit sweeps (about half an
# hour on 2 cores). `bash scripts/local_slurm.sh down` stops the daemons afterwards.
test-slurm: $(STAMP)
	bash scripts/local_slurm.sh up
	$(PY) -m pytest -q -s -m slurm tests/test_slurm_cluster.py $(PYTEST_ARGS)

# A wheel of this tree installed (non-editable) into a temporary venv runs a stage from another folder.
test-package: $(STAMP)
	$(PY) -m pytest -q tests/test_package.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts

smoke: $(STAMP)
	bash scripts/reproduce.sh experiment=smoke $(ARGS)

# The DDPM branch of the smoke chain (a tiny diffusers UNet2DModel trained from scratch on the IT loss, then
# the same steps), kept out of `make smoke` to keep that short (the DDPM steps took 5.5 minutes on 2 busy
# cores, 2026-11-29, commit c6d0db9). MODELS=iddpm,ddpm runs both families and their ensemble of all four models.
smoke-ddpm: MODELS ?= ddpm
smoke-ddpm: $(STAMP)
	MODELS=$(MODELS) MASKED=$${MASKED:-0} bash scripts/reproduce.sh experiment=smoke $(ARGS)

# MODELS=iddpm,ddpm (default), MASKED=1, PUBLISHED=0: see scripts/reproduce.sh
reproduce: $(STAMP)
	bash scripts/reproduce.sh experiment=paper $(ARGS)

# The estimator-efficiency bench measures the model `make smoke` fine-tunes: run the smoke chain first
# when its checkpoint is missing (101 s on an idle 2-core CPU at commit c012802; done steps are skipped).
bench: $(STAMP)
	@ls checkpoints/finetune/smoke-*-tune/model.pt >/dev/null 2>&1 || $(MAKE) smoke
	@for f in scripts/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
