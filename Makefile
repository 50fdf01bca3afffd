# Two entry points: `make run` (the default experiment) and `make test` (the suite).
# Each creates .venv on first use. Where no NVIDIA GPU is present, the CPU build of torch is installed.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
ARGS ?=
# Test files run in two processes (pytest-xdist; each its own Ray cluster): the suite waits on process and
# cluster start-ups as much as it computes. TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2

$(VENV)/.ready: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: setup run test lint
setup: $(VENV)/.ready

run: $(VENV)/.ready
	$(PY) -m epd.run $(ARGS)

test: $(VENV)/.ready
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check epd simulator tests bench
