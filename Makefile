# The two commands a user needs: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DHOW := $(VENV)/bin/dhow
STAMP := $(VENV)/.installed
DEMO := demo-models

.PHONY: run test install system-packages bench-packages demo-models lint format check-proto proto image bench bench-rollouts bench-security bench-serving bench-protocols bench-batch bench-scaling bench-monitoring bench-drift bench-gateway bench-streaming clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pinned so that pip takes the CPU build, not gigabytes of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests run for real: the proxies `dhow gateway config` configures (tests/test_e2e_gateway.py),
# Prometheus and promtool for deploy/'s rules and dashboard (tests/test_deploy_monitoring.py)
SYSTEM_PACKAGES := haproxy nginx-light prometheus
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-packages:
	@test -x /usr/sbin/haproxy -a -x /usr/sbin/nginx -a -x /usr/bin/prometheus -a -x /usr/bin/promtool || { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); }

# Debian's wrk, the C load generator of the overhead benchmarks' cross-check (benchmarks/wrk_load.py: ``--generator wrk``)
BENCH_PACKAGES := wrk
bench-packages:
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BENCH_PACKAGES); }

$(DEMO)/.built: $(STAMP)
	$(DHOW) demo build --out $(DEMO)
	touch $@

demo-models: $(DEMO)/.built

run: $(DEMO)/.built
	$(DHOW) serve --repository $(DEMO) --host 127.0.0.1 --http-port 8080 --grpc-port 8081

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	# the layer contracts of pyproject.toml [tool.importlinter]
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

# regenerate the gRPC stubs from the .proto (committed; tests check they match)
proto: $(STAMP)
	$(PY) -m dhow.protocols.grpc.codegen --write

check-proto: $(STAMP)
	$(PY) -m dhow.protocols.grpc.codegen --check

# dhow's container images (Dockerfile, Dockerfile.cuda) with the engine running here; fails, saying so, without one
image:
	bash deploy/build-images.sh

# benchmarks are measured side by side in one run and reported as ratios; never part of `make test`
bench: bench-rollouts bench-security bench-protocols bench-serving bench-batch bench-scaling bench-monitoring bench-drift bench-gateway

bench-rollouts: $(STAMP)
	$(PY) benchmarks/rollout_routing.py

bench-security: $(STAMP)
	$(PY) benchmarks/security_overhead.py

# KServe v1 / TF Serving :predict and TorchServe next to v2 JSON, one server, one run; about 2 minutes
bench-protocols: $(STAMP)
	$(PY) benchmarks/protocols.py

# dhow batch run against a bare pyarrow -> onnxruntime loop, and its Spark engine against predict_batch_udf
bench-batch: $(STAMP)
	$(PY) benchmarks/batch.py

bench-streaming: $(STAMP)
	$(PY) benchmarks/streaming.py

# drift scoring on precomputed reference bins against scipy's KS test on the raw rows; seconds
bench-drift: $(STAMP)
	$(PY) benchmarks/drift_scoring.py

# the chart's queue-depth scaling rule against a CPU-based HPA over a simulated bursty day, from RESULTS.md's figures
bench-scaling: $(STAMP)
	$(PY) benchmarks/autoscale_sim.py

# drift, the payload log (file) and tracing (ratio 0.1) on and off, one run (wrk, 5 rounds, fresh servers each); about 6 minutes
bench-monitoring: $(STAMP) bench-packages
	$(PY) benchmarks/monitoring_overhead.py --rounds 5 --generator wrk --fresh-servers

# the proxy `dhow gateway config` writes (HAProxy, make system-packages) against dhow direct; about 2 minutes
bench-gateway: $(STAMP) system-packages
	$(PY) benchmarks/gateway.py

# dhow against Seldon MLServer 1.7.1 (installed on first run into benchmarks/.peers/); about 10 minutes
bench-serving: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .ruff_cache
