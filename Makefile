# Convenience targets; the scripts are the source of truth (they also work without make).
.PHONY: setup test demo lint bench
setup:
	scripts/setup.sh
test:
	scripts/test.sh
demo:
	scripts/demo.sh
lint:
	.venv/bin/ruff check nbdsink plugins tests bench && .venv/bin/mypy
