"""Text in: the built-in corpus builtin:python-docs (corpus.py), reading data files and the train/eval split
(texts.py), texts as cached Arrow tables (tables.py), QA records for fine-tuning: PwC-format files and the
built-in builtin:python-docs-qa (qa.py), tokenizing once with a cache (tokens.py), and `--streaming`
examples (stream.py). The command that writes data files, `icae prepare`, is icae/recipes/prepare.py."""
