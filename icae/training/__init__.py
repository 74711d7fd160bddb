"""Training components: a transformers Trainer that saves only what ICAE trains, complete-checkpoint
handling (resume, rotation) and divergence checks (trainer.py); preemption signals, the output_dir lock
and full-disk detection (faults.py). The training loops that use them are the recipes
icae/recipes/pretrain.py and icae/recipes/finetune.py."""
