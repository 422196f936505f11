"""The names the command line offers as choices, importable without torch so that `lmkit
--help` stays instant. Each is the key list of a table in a heavier module, which uses the
tuple here or is checked against it (tests/test_cli.py), so the two cannot drift apart."""

# lmkit.tasks.TASKS
TASKS = ("classification", "ner", "translation", "summarization", "generation", "fill-mask")
# lmkit.finetune.schemes
SCHEMES = ("full", "frozen", "top-k", "lora")
# lmkit.train.pretrain.OBJECTIVES, after "auto" (the family's default)
OBJECTIVES = ("auto", "causal", "mlm", "span", "infilling")
