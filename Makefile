# qwen-worker: `make demo` and `make test` work on a fresh machine. Versions: pyproject.toml.
VENV ?= .venv
PY := $(VENV)/bin/python
NUM_SHARD ?= 1
# make demo QUANTIZE=int4 (or int8, fp8): serve the demo model quantized
QUANTIZE ?= none
# Test packages installed without their dependencies (pyproject.toml, [test], says why).
NO_DEPS := lorax-client==0.6.3 text-generation==0.7.0
STUBS := worker/pb/generate_pb2.py worker/pb/generate_pb2_grpc.py

.PHONY: install proto test test-gpu test-packaging soak demo lint clean

install: $(VENV)/.installed

# On a CPU-only machine the CPU build of torch goes in first (from local disk), so that pip never pulls
# a CUDA build. The editable install generates the stubs into worker/pb/.
$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test,gpu]' || { echo "triton not installed: Triton kernel tests will be skipped"; \
		$(PY) -m pip install -q -e '.[test]'; }
	$(PY) -m pip install -q --no-deps $(NO_DEPS)
	touch $@

proto: $(STUBS)

$(STUBS) &: proto/generate.proto scripts/gen_proto.py | $(VENV)/.installed
	$(PY) scripts/gen_proto.py

test: install proto
	$(PY) -m pytest -q tests

test-gpu: install proto
	$(PY) -m pytest -q -m gpu tests/gpu

# A fresh virtualenv, `pip install -e .` and `pip install .` of a copy of the tracked files, a shard served.
test-packaging: install
	QWEN_PACKAGING_TEST=1 $(PY) -m pytest -q tests/packaging

# The long soaks (router: 2,000 requests, 16 clients, TP=2 over gloo; HTTP front: 3,000 streams, 32 clients, 30%
# disconnecting) and a long fuzz of the gRPC surface; CI runs small ones.
soak: install proto
	QWEN_SOAK_REQUESTS=2000 QWEN_SOAK_CLIENTS=16 QWEN_SOAK_SHARDS=2 QWEN_HTTP_SOAK_REQUESTS=3000 QWEN_HTTP_SOAK_CLIENTS=32 \
		$(PY) -m pytest -q -s -m soak tests/soak
	QWEN_FUZZ_RANDOM=1 QWEN_FUZZ_EXAMPLES=1500 $(PY) -m pytest -q -s tests/integration/test_fuzz_grpc.py

demo: install proto
	$(PY) scripts/demo.py --num-shard $(NUM_SHARD) --quantize $(QUANTIZE)

# Every check runs; any finding fails the target.
lint: install proto
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	$(VENV)/bin/mypy || status=1; \
	$(VENV)/bin/lint-imports || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) $(STUBS) .demo build *.egg-info .mypy_cache .ruff_cache .import_linter_cache
