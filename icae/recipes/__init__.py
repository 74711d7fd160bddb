"""Recipes: the workflows behind the `icae` commands, each a module with `main(argv)`, built from the
components in icae.core, icae.data and icae.training (which never import a recipe).

- pretrain.py  `icae pretrain`: arguments -> data -> model -> Trainer -> save and eval
- finetune.py  `icae finetune`: the same from a pretrain checkpoint, on {input, prompt, answer} records
- evaluate.py  `icae eval`: losses, reconstruction scores and perplexities of a checkpoint; --task qa:
               answers from memory slots / full context / no context
- use.py       `icae compress / reconstruct / generate` (generate --context FILE --prompt ...)
- layout.py    `icae layout`: the position ids a layout assigns, as JSON
- ablate.py    `icae ablate`: a grid of pretraining runs, then a report
- report.py    `icae report`: loss curves, a table and a summary of finished runs
- demo.py      `icae demo`: a short pretraining and evaluation on the embedded model
"""
