# The two README commands: `make demo` (main job on the embedded model) and `make test`.
.PHONY: demo test venv stop

venv:
	@scripts/venv.sh test,crf,onnx,serve

test: venv
	@scripts/run_tests.sh

demo: venv
	@.venv/bin/python -m weclip_infer.quickstart

stop:
	@.venv/bin/python -m weclip_infer.quickstart --stop
