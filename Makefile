# Two commands do everything (see README):
#   make course   set up .venv (created or reused) and run the main job
#   make test     set up .venv and run every test, notebooks included (pytest --nbval)
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup course test clean

setup:
	@VENV=$(VENV) bash scripts/setup_env.sh

course: setup
	$(VENV)/bin/tinygptv params --preset nano --stage 4
	$(VENV)/bin/tinygptv course --preset nano --out runs/course

test: setup
	TQDM_DISABLE=1 $(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg tests notebooks

clean:
	rm -rf $(VENV) .pytest_cache
