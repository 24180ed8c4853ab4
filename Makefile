# mpipar: every target installs what it needs into .venv first (Python >= 3.10 and pip only).
#   make test    the whole suite: serial tests, then MPI tests at world sizes 1, 2, 3, 4, 8
#   make train   mpirun -n 8 python -m mpipar.train (the default model and corpus)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
NP     ?= 8
EXTRAS ?= mpich,test,io,plot

.PHONY: install test train bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m mpipar.testing

train: $(VENV)/.installed
	$(VENV)/bin/mpirun -n $(NP) $(PY) -m mpipar.train $(ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/mpiexec -n 2 $(PY) -m mpipar.bench collectives $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
