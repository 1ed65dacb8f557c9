# qwen-worker: `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
NUM_SHARD ?= 1

.PHONY: install proto test test-gpu demo lint clean

install: $(VENV)/.installed

# On a CPU-only machine the CPU build of torch goes in first; elsewhere setup.py asks torch>=2.10.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q 'triton==3.9.0' || echo "triton not installed: Triton kernel tests will be skipped"
	$(PY) scripts/gen_proto.py
	touch $@

proto: install
	$(PY) scripts/gen_proto.py

test: install proto
	$(PY) -m pytest -q tests

test-gpu: install proto
	$(PY) -m pytest -q -m gpu tests/gpu

demo: install proto
	$(PY) scripts/demo.py --num-shard $(NUM_SHARD)

lint:
	$(PY) -m pyflakes worker router_client scripts tests 2>/dev/null || $(PY) -m compileall -q worker router_client scripts tests

clean:
	rm -rf $(VENV) worker/pb/generate_pb2*.py .demo build *.egg-info
