.PHONY: setup demo test test-fast quality style

setup:
	bash scripts/setup.sh

# The main job: base / full FT / LoRA / CoFiTune coarse / CoFiTune + update mask fine-tuned on number-only arithmetic
# on the embedded SmolLM2-135M-Instruct, each at its learning rate selected on validation; the frontier tables, a
# verdict, comparison.{json,md,png}, demo.json and the CoFiTune adapters. `make demo DEMO_ARGS=--quick`: smoke run.
demo: setup
	. .venv/bin/activate && cofitune demo --output-dir outputs/demo $(DEMO_ARGS)

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
