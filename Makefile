# Two entry points that do all the set-up on a fresh machine:
#   make demo   generate the synthetic data, train, evaluate, report
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) launch.py --config=configs/synthetic.py --workdir=runs/synthetic

test: $(STAMP)
	$(PY) -m pytest tests --durations=15

bench: $(STAMP)
	$(PY) -m benchmarks.encoders

clean:
	rm -rf $(VENV) runs
