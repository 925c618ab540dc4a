# Two commands on a fresh machine:  `make demo`  and  `make test`.  Each builds what it needs from lock files.
#
# Two locked environments, because LAVIS 1.0.2 pins transformers<4.27 and numpy<2:
#   .venv     the LAVIS family (recipes, demo, benchmarks)  requirements/lock-lavis.txt
#   .venv-hf  transformers 5 BLIP / BLIP-2, peft, numpy 2   requirements/lock-hf.txt
# Both use the same torch; the core (aurora_pet without a family) is tested in both.
PYTHON ?= python3
LAVIS  := .venv
HF     := .venv-hf

.PHONY: install install-lavis install-hf demo demo-hf test test-lavis test-hf test-fast lock clean

install: install-lavis install-hf
install-lavis: $(LAVIS)/.installed
install-hf: $(HF)/.installed

# $(1): environment directory, $(2): its lock file
define make_env
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --no-deps -r $(2)
	$(1)/bin/pip install --no-deps --no-build-isolation -e .
	touch $(1)/.installed
endef

$(LAVIS)/.installed: requirements/lock-lavis.txt pyproject.toml
	$(call make_env,$(LAVIS),requirements/lock-lavis.txt)

$(HF)/.installed: requirements/lock-hf.txt pyproject.toml
	$(call make_env,$(HF),requirements/lock-hf.txt)

demo: install-lavis
	$(LAVIS)/bin/aurora-pet demo

# The same demo with transformers' BLIP (BlipForImageTextRetrieval) and the hf recipe runner, in .venv-hf.
demo-hf: install-hf
	$(HF)/bin/aurora-pet demo --family hf

# The whole suite, slow integration tests included (what CI runs): the core and the transformers family in
# .venv-hf, the core and the LAVIS family in .venv. Both parts run even if the first fails.
test: install
	@status=0; \
	$(MAKE) --no-print-directory test-hf PYTEST_ARGS='-m "slow or not slow"' || status=1; \
	$(MAKE) --no-print-directory test-lavis PYTEST_ARGS='-m "slow or not slow"' || status=1; \
	exit $$status

PYTEST_ARGS ?=
test-hf: install-hf
	AURORA_PET_TEST_FAMILIES=hf $(HF)/bin/python -m pytest $(PYTEST_ARGS) tests/core tests/hf

test-lavis: install-lavis
	AURORA_PET_TEST_FAMILIES=lavis $(LAVIS)/bin/python -m pytest $(PYTEST_ARGS) tests/core tests/lavis

# The quick inner loop: unit tests only, both environments.
test-fast: install
	$(MAKE) --no-print-directory test-hf
	$(MAKE) --no-print-directory test-lavis

lock: install
	$(LAVIS)/bin/pip freeze --all --exclude-editable | sed "/^pip==/d" > requirements/lock-lavis.txt.new
	$(HF)/bin/pip freeze --all --exclude-editable | sed "/^pip==/d" > requirements/lock-hf.txt.new
	mv requirements/lock-lavis.txt.new requirements/lock-lavis.txt
	mv requirements/lock-hf.txt.new requirements/lock-hf.txt

clean:
	rm -rf $(LAVIS) $(HF)
