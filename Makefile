# taskhost — the two set-up commands are `make run` and `make test` (see README.md).
CARGO ?= cargo
PLUGINS_DIR ?= dist/plugins
TASKHOST := target/debug/taskhost

.PHONY: run test plugins build bench test-deps clean install
## Where `make install` puts the binary: $(PREFIX)/bin/taskhost.
PREFIX ?= $(HOME)/.local

## Serve the example plugins on the embedded broker (builds everything first);
## `make run BROKER=redis://127.0.0.1:6379/0` serves a Redis instead (examples/producer.py).
run: plugins build
	$(TASKHOST) serve --plugins $(PLUGINS_DIR) $(if $(BROKER),--broker $(BROKER))

## A release build of taskhost on PATH (as $(PREFIX)/bin/taskhost).
install:
	$(CARGO) install --locked --path host --root $(PREFIX)
	@echo "installed $(PREFIX)/bin/taskhost; make sure $(PREFIX)/bin is on PATH"


## The whole test suite: installs what it needs, builds plugins once, runs every test.
test: test-deps plugins
	@# With taskhost-sdk: its macros' dependencies then resolve as in the test build below, and
	@# wasmtime is compiled once for the whole run (host/Cargo.toml pins the rest).
	$(CARGO) build -p taskhost -p taskhost-sdk -p slow-server
	@# Every component compiled once into the tests' compile cache, before the tests load the
	@# machine: a Python one takes ~15 s alone (65 s for the five on two cores), and compiled
	@# by a test's own worker beside the parallel suite one was not served in time once.
	TASKHOST_CACHE_DIR=$(CURDIR)/target/test-compile-cache $(TASKHOST) plugins compile --plugins $(PLUGINS_DIR)
	TASKHOST_CACHE_DIR=$(CURDIR)/target/test-compile-cache $(TASKHOST) plugins compile --plugins $(dir $(PLUGINS_DIR))python-plugins
	TASKHOST_PLUGINS_DIR=$(CURDIR)/$(PLUGINS_DIR) TASKHOST_BIN=$(CURDIR)/$(TASKHOST) \
	  TASKHOST_PYTHON=$(CURDIR)/.venv/bin/python \
	  $(CARGO) test -p taskhost -p taskhost-sdk -p taskhost-e2e
	@# Tests timed against absolute bounds, and the crash soak, alone on the machine after the rest.
	@# The same packages as above: `-p taskhost-e2e` alone unifies wasmtime's features
	@# differently and rebuilt wasmtime and taskhost (~2 min) just for these.
	TASKHOST_PLUGINS_DIR=$(CURDIR)/$(PLUGINS_DIR) TASKHOST_BIN=$(CURDIR)/$(TASKHOST) \
	  TASKHOST_PYTHON=$(CURDIR)/.venv/bin/python \
	  $(CARGO) test -p taskhost -p taskhost-sdk -p taskhost-e2e -- --ignored --test-threads 1 --exact \
	  tenants::a_tenant_behind_a_flood_of_100k_starts_within_50_ms \
	  tenants::a_flood_over_1000_task_names_and_two_queues_is_no_different \
	  tenants::usage_is_metered_per_tenant_within_5_percent_of_the_process_cpu \
	  chaos::a_crash_soak_of_100k_tasks_through_kill_9_and_sigstop_stores_every_result \
	  reliability::a_well_behaved_task_beside_hostile_ones_keeps_its_round_trip_p99_within_2x_of_beside_harmless_ones
	@# 60 s of fuzzing from the kept corpus where nightly Rust is installed (it says why not where not).
	bash scripts/fuzz-smoke.sh

## Every example component into dist/plugins/<task>@<version>.wasm.
plugins:
	bash scripts/build-plugins.sh $(PLUGINS_DIR)

build:
	$(CARGO) build -p taskhost

test-deps:
	bash scripts/test-deps.sh

## taskhost against Celery, side by side (release build; BENCH_SCALE=0.1 for a quick run;
## BENCH_ARGS=--only-io for the http.fetch scenario alone, --only-tenants for the tenant ones, --only-events for what Celery events cost,
## --only-soak for the memory soak: 10 million no-op tasks and 100,000 thumbnails, --only-sql for results in PostgreSQL,
## --only-amqp for the drain with RabbitMQ as the broker).
BENCH_SCALE ?= 1
bench: test-deps plugins
	.venv/bin/pip install --quiet --disable-pip-version-check pillow
	$(CARGO) build --release -p taskhost -p slow-server
	.venv/bin/python bench/run.py --taskhost target/release/taskhost --plugins $(PLUGINS_DIR) --scale $(BENCH_SCALE) $(BENCH_ARGS)

clean:
	rm -rf dist
	$(CARGO) clean
