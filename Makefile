PYTHON ?= python
PUSHT_ZARR ?= $(firstword $(wildcard ../shared/data/pusht/pusht_cchi_v7_replay.zarr) data/pusht/pusht_cchi_v7_replay.zarr)
export PUSHT_ZARR

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format bench data data-blockpush train-debug finetune clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

install: ## Install torch (CPU 2.13 unless one is installed), then this package with dev tools
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

# Test processes: each runs torch on one thread, so N processes use N cores.
TEST_WORKERS ?= 2

test: ## Run the fast test suite (excludes slow and gpu tests) on TEST_WORKERS processes
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n $(TEST_WORKERS)

test-all: ## Run every test, slow ones included (gpu tests need CUDA)
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n $(TEST_WORKERS) -m "not gpu or gpu"

lint: ## Check style with ruff
	ruff check . && ruff format --check .

format: ## Format and fix with ruff
	ruff format . && ruff check --fix .

bench: ## Print training/inference/data/rollout benchmarks
	$(PYTHON) scripts/bench.py

data: ## Download and unpack the Push-T demonstrations into data/
	$(PYTHON) scripts/download_pusht.py

data-blockpush: ## Generate the 1,000 BlockPush oracle demonstrations (and the CPU recipe's 2,000, with detours) into data/blockpush/
	$(PYTHON) scripts/generate_blockpush.py
	$(PYTHON) scripts/generate_blockpush.py --detour-prob 0.03 --n-episodes 2000 --dest data/blockpush/blockpush_paper_v3_detour03_n2000.zarr

train-debug: ## A tiny end-to-end training run (seconds)
	$(PYTHON) train.py +experiment=pusht_lowdim +debug=fast

finetune: ## RL fine-tuning (DPPO) of a trained checkpoint: make finetune CKPT=path/to.ckpt
	$(PYTHON) finetune.py +experiment=pusht_lowdim_rl checkpoint=$(CKPT)

clean: ## Remove run outputs and caches
	rm -rf outputs multirun wandb .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
