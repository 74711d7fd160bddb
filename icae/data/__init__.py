"""Text in: the built-in corpus and streaming readers of data files (texts.py), texts as cached Arrow tables
(tables.py), QA records for fine-tuning: PwC-format files and the built-in builtin:python-docs-qa (qa.py),
tokenizing once with a cache (tokens.py), `--streaming` examples (stream.py), and `icae prepare`, which
builds the seed's train/eval files and PwC's (prepare.py)."""
