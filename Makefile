# retm-relay: `make run` starts the relay on 127.0.0.1:8080, `make test` runs every check.
# Both create .venv, install what they need, and start RabbitMQ (and Redis) when none answers.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
CONFIG ?= config/relay.example.toml

.PHONY: run test lint format venv services browser tools node bench chaos clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(STAMP)

services:
	@bash deploy/scripts/ensure-services.sh rabbitmq redis

# Debian's Chromium for the status page's browser tests (installed with apt-get when missing).
browser:
	@bash deploy/scripts/ensure-chromium.sh

# promtool and nginx for the deployment kit's tests, unpacked into .venv/tools when missing.
tools: $(STAMP)
	@bash deploy/scripts/ensure-tools.sh $(VENV)/tools

# A random development token, kept out of the repository; the README's curl examples use it.
var/dev-token: | $(STAMP)
	@mkdir -p var
	@umask 077 && $(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))' > $@

run: $(STAMP) var/dev-token
	@bash deploy/scripts/ensure-services.sh rabbitmq
	@echo "retm-relay: webhook token in var/dev-token; Ctrl-C stops the relay"
	RELAY_AUTH_TOKENS_FILE=var/dev-token $(BIN)/retm-relay serve --config $(CONFIG)

# The Node.js projects the tests run, installed from their lockfiles with `npm ci`: the AsyncAPI
# parser that validates docs/asyncapi.yaml, and the Node consumer example.
NODE_PROJECTS := tools/asyncapi deploy/examples/consumers/node
NODE_STAMPS := $(addsuffix /node_modules/.installed,$(NODE_PROJECTS))

%/node_modules/.installed: %/package-lock.json %/package.json
	cd $* && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

node: $(NODE_STAMPS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The multi-node tests (mark "cluster": a RabbitMQ cluster, Redis Sentinel and Cluster of their
# own, a few minutes) run on their own after the rest.
test: lint services browser tools node
	$(BIN)/pytest -m "not cluster"
	$(BIN)/pytest -m cluster

# The benchmark (bench/run.py, docs/performance.md): retm-relay side by side with the naive relay
# at fixed rates and at 32 connections, a few minutes; BENCH_ARGS="--quick" for a smoke run,
# "--profile" to sample the relay with py-spy as well (installed into .venv then).
# Installs wrk with apt-get when missing (as root); results also go to bench/results/*.json.
bench: $(STAMP)
	@bash deploy/scripts/ensure-services.sh rabbitmq redis wrk
	@case " $(BENCH_ARGS) " in *" --profile "*) $(BIN)/python -m pip install -q py-spy ;; esac
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The chaos soak (chaos/soak.py): 20,000 RETM-like events while the broker link is cut and
# stalled and the relay is killed with SIGKILL and restarted; prints the loss table.
# CHAOS_ARGS=--cluster: against a 3-node RabbitMQ cluster and a Redis Sentinel set of its own,
# with node kills and Sentinel failovers as well (docs/several-machines.md).
chaos: $(STAMP) services
	$(BIN)/python -m chaos.soak $(CHAOS_ARGS)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
