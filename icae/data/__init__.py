"""Text in: the built-in corpus and data files (texts.py), tokenizing once with a cache (tokens.py), and
`icae prepare`, which builds the seed's train/eval JSON files (prepare.py)."""
