# The two commands of the README. Each sets up .venv first (idempotent: a no-op when
# pyproject.toml and scripts/setup.sh are unchanged since the last setup).
.PHONY: setup serve test lint typecheck protos

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/switchyard serve $(ARGS)

lint: setup
	.venv/bin/ruff check switchyard tests bench scripts
	.venv/bin/ruff format --check switchyard tests bench scripts

typecheck: setup
	.venv/bin/mypy switchyard

test: lint typecheck
	.venv/bin/python -m pytest -q -ra $(PYTEST_ARGS)

protos: setup
	.venv/bin/python scripts/gen_protos.py
