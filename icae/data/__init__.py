"""Text in: the built-in corpus and data files (texts.py), QA records for fine-tuning: PwC-format files
and the built-in builtin:python-docs-qa (qa.py), tokenizing once with a cache (tokens.py), and
`icae prepare`, which builds the seed's train/eval JSON files and PwC's (prepare.py)."""
