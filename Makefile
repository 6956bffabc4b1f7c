# The two README commands: `make demo` (main job on the embedded model) and `make test`.
# Also: `make test-fast` (the quick lane, no slow/serving tests), `make lint` (ruff + mypy), `make stop`.
.PHONY: demo test test-fast lint venv stop

EXTRAS ?= test,lint,crf,onnx,serve,ray,triton

venv:
	@scripts/venv.sh $(EXTRAS)

test: venv
	@scripts/run_tests.sh

test-fast: venv
	@scripts/run_tests.sh -m "not slow and not serve and not fullsize and not ray"

lint: venv
	@.venv/bin/ruff check weclip_infer tests benchmarks training export docs
	@.venv/bin/mypy

demo: venv
	@.venv/bin/python -m weclip_infer.quickstart

stop:
	@.venv/bin/python -m weclip_infer.quickstart --stop
