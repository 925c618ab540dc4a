# Two commands on a fresh machine:  `make demo`  and  `make test`.  Each builds .venv from the lock first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lock clean

install: $(STAMP)

$(STAMP): requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --no-deps -r requirements/lock.txt
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/aurora-pet demo

# The whole suite, slow integration tests included (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

# The quick inner loop: unit tests only.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lock: $(STAMP)
	$(BIN)/pip freeze --all --exclude-editable | sed "/^pip==/d" > requirements/lock.txt.new && mv requirements/lock.txt.new requirements/lock.txt

clean:
	rm -rf $(VENV)
