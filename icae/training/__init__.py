"""Training components: a transformers Trainer that saves only what ICAE trains, complete-checkpoint
handling (resume, rotation) and divergence checks (trainer.py). The training loop that uses them is
the recipes icae/recipes/pretrain.py and icae/recipes/finetune.py."""
