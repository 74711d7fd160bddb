"""Recipes: the workflows behind the `icae` commands, each a module with `main(argv)`, built from the
components in icae.core, icae.data and icae.training (which never import a recipe). A recipe may call
another recipe's entry point (`ablate` runs `pretrain.main`), never its internals.

- pretrain.py  `icae pretrain`: arguments -> data -> model -> run (the run: icae/training/run.py)
- finetune.py  `icae finetune`: the same from a pretrain checkpoint, on {input, prompt, answer} records
- prepare.py   `icae prepare`: the seed's train/eval files (SlimPajama or local files); --dataset pwc: PwC's
- evaluate.py  `icae eval`: losses, reconstruction scores and perplexities of a checkpoint; --task qa:
               answers from memory slots / full context / no context
- use.py       `icae compress / reconstruct / generate` (generate --context FILE --prompt ...)
- layout.py    `icae layout`: the position ids a layout assigns, as JSON
- ablate.py    `icae ablate`: a grid of pretraining runs, then a report
- report.py    `icae report`: loss curves, a table and verdict sentences of finished runs, from the
               numbers of report_stats.py (runs read, cells over seeds, Welch intervals)
- export.py    `icae export`: a smaller copy of a checkpoint (float16, lower LoRA rank by SVD)
- demo.py      `icae demo`: a short pretraining and evaluation on the embedded model
"""
