.PHONY: setup demo test test-fast quality style

setup:
	bash scripts/setup.sh

# The main job: a real fine-tune of the embedded SmolLM2-135M-Instruct with CoFiTune.
demo: setup
	. .venv/bin/activate && python examples/quickstart.py

# The whole test suite, slow real-model tests included.
test: setup
	bash scripts/test.sh

# Without the real-model and multi-process tests (a few minutes).
test-fast: setup
	bash scripts/test.sh -m "not slow and not multiprocess"

quality:
	. .venv/bin/activate && ruff check cofitune_peft tests examples benchmarks && ruff format --check cofitune_peft tests examples benchmarks

style:
	. .venv/bin/activate && ruff check --fix cofitune_peft tests examples benchmarks && ruff format cofitune_peft tests examples benchmarks
