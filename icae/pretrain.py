"""`python -m icae.pretrain ...` = `icae pretrain ...`, a documented entry point kept for existing
launch scripts; the recipe itself is icae/recipes/pretrain.py."""

import sys

if __name__ == "__main__":
    from icae.cli import main

    main(["pretrain", *sys.argv[1:]])
