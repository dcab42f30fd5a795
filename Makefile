# The two commands of the README. Both start from nothing: they create .venv and install.
# A GPU user installs the torch build they need into .venv first; an existing torch is left alone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
MODEL  ?= tiny
SIZE   ?= full
DEVICE ?=
DTYPE  ?=
STORE  ?=
# Tests: two workers, each test file (or notebook class) kept on one worker, one math thread per worker.
PYTEST_ARGS ?= -n 2 --dist loadscope

.PHONY: install test report clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	MPLBACKEND=agg OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

# The main job: every notebook executed with papermill into reports/ (smoke slice on the tiny model;
# on real weights the scale SIZE=quick|full, e.g. make report MODEL=CompVis/stable-diffusion-v1-4 DEVICE=cuda DTYPE=fp16;
# SD 2.x and SDXL too: MODEL=stabilityai/stable-diffusion-2-1, MODEL=stabilityai/stable-diffusion-xl-base-1.0; offline stand-ins tiny-sd2, tiny-xl).
report: install
	MPLBACKEND=agg $(PY) -m anelab report --model "$(MODEL)" --size $(if $(filter tiny tiny-sd2 tiny-xl,$(MODEL)),smoke,$(SIZE)) --out reports \
		$(if $(DEVICE),--device $(DEVICE)) $(if $(DTYPE),--dtype $(DTYPE)) $(if $(STORE),--store $(STORE))

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build dist
