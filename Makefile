# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
# What serving needs (requirements.txt), then what the tests need on top (requirements-test.txt);
# each stamp is remade when its file changes, and the test one whenever the serving one is.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CONFIG ?= config.yaml

.PHONY: serve test test-postgresql check crashtest faulttest fuzz clean bench console-screenshots

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	touch $(TEST_STAMP)

serve: $(STAMP)
	$(VENV)/bin/loyalty serve --config $(CONFIG)

test: $(TEST_STAMP)
	$(VENV)/bin/pytest -q

# The suite again on PostgreSQL: one throwaway cluster (tests/backend.py), a fresh database
# per test; tests about SQLite's file are skipped with their reason, and those that open no
# database or start clusters of their own (test_pg_*) are left out (they ran in `make test`).
test-postgresql: $(TEST_STAMP)
	LOYALTY_TEST_BACKEND=postgresql $(VENV)/bin/pytest -q

# SIGKILL the server under load many times, on SQLite and (one of two servers) on PostgreSQL,
# whose restart and failover tests run too (skipped without PostgreSQL); `make test` runs a
# short form of the same tests.
crashtest: $(TEST_STAMP)
	CRASH_CYCLES=$${CRASH_CYCLES:-50} $(VENV)/bin/pytest -q tests/test_crash_safety.py tests/test_pg_crash_safety.py

# Faults held for longer against the real server; `make test` runs short forms of the same
# tests: four clients for 30 s keep the WAL under 64 MiB, 1,100 silent connections for a minute
# against a 1,024-file server (the full-disk test mounts a tmpfs: root only), the console's
# memory over 1,000 checks and 1,000 backtests (200 in `make test`), and 100,000 imported
# members with balances through audit verify and a rerun that changes nothing.
faulttest: $(TEST_STAMP)
	FAULT_LONG=1 $(VENV)/bin/pytest -q -s tests/test_wal_bounded.py tests/test_storage_faults.py tests/test_connections.py \
		tests/test_console_memory.py tests/test_import_members.py

# Generated requests and programs, and random sequences of valid operations with the books
# checked after each; `make test` runs FUZZ_EXAMPLES=20 and LEDGER_EXAMPLES=8 of the same tests.
# LOYALTY_TEST_BACKEND=postgresql make fuzz runs them on PostgreSQL.
fuzz: $(TEST_STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-300} LEDGER_EXAMPLES=$${LEDGER_EXAMPLES:-300} LEDGER_STEPS=$${LEDGER_STEPS:-60} \
		FUZZ_RANDOM=1 $(VENV)/bin/pytest -q -s tests/test_fuzz_api.py tests/test_fuzz_rules.py tests/test_ledger_invariants.py

# The console's browser test (Debian's chromium), keeping a screenshot of each page in docs/console/.
console-screenshots: $(TEST_STAMP)
	CONSOLE_SCREENSHOTS=docs/console $(VENV)/bin/pytest -q tests/test_console_browser.py

# Throughput and latency of the real server against its ceiling, and on PostgreSQL beside
# SQLite (BENCH_PG=0 skips that); writes benchmarks/RESULTS.md.
# BENCH_MEMBERS=10000,1000000 by default; add 14000000 for the full size (generates ~33 GB once, about an hour).
bench: $(STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v taskset >/dev/null || { apt-get update -qq && apt-get install -y -qq util-linux; }
	$(VENV)/bin/pip install -q --disable-pip-version-check -r benchmarks/requirements.txt
	PYTHONPATH=. $(VENV)/bin/python benchmarks/run.py

check: $(STAMP)
	$(VENV)/bin/loyalty rules check rules/programs/market

clean:
	rm -rf $(VENV) data/*.db data/*.db-wal data/*.db-shm
