"""The experiment kit: evaluation, coarse search, a plain SFT loop, offline data, model loading and the demo.

Everything here is built on the public API of the method core (`cofitune_peft` and its documented modules) and
nothing in the core imports it, so it could live in another repository unchanged. `import cofitune_peft` does not load
it; its heavier dependencies come with `pip install "cofitune-peft[eval]"` (evaluation, search, plots) and
`"cofitune-peft[demo]"` (the embedded model and the offline data). A kit function whose extra is missing raises
`cofitune_peft.errors.MissingExtraError`, one line that names the extra to install.

Subpackages: `evaluation` (SpecialityEval, VersatilityEval, scores), `search` (search_layers, SearchResult),
`training` (train_sft), `data` (the demo's tasks), `loading` (load_model, the embedded SmolLM2), `state_file` (caches
that cannot run code), `demo`, `cli`.
"""
