# dynrobust — the two commands: `make demo` and `make test`. Both set everything up
# themselves (venv with torch==2.13.0, Fashion-MNIST, release build) and skip what exists.
CARGO ?= cargo
BIN := $(or $(CARGO_TARGET_DIR),target)/release/dynrobust

.PHONY: demo test setup tools venv data data-mnist build bench doc clean-runs

demo: setup build
	scripts/demo.sh

test: setup
	$(CARGO) test --release --workspace --no-fail-fast

setup: tools venv data

tools:
	scripts/setup.sh tools

venv:
	scripts/setup.sh venv

data:
	scripts/setup.sh data

data-mnist:
	scripts/setup.sh data-mnist

build: venv
	$(CARGO) build --release --workspace

bench: setup build
	$(BIN) bench sparse
	scripts/bench_runner.sh

doc: venv
	$(CARGO) doc --no-deps --workspace

clean-runs:
	rm -rf runs
