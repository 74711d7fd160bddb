"""Training components, shared by the training recipes (icae/recipes/pretrain.py, finetune.py): the flags
every training command takes and their parsing (arguments.py); the run plumbing: checks before anything
loads, the output folder (resume, lock, tidy), the model, the run (run.py); a transformers Trainer that
saves only what ICAE trains, complete-checkpoint handling and divergence checks (trainer.py); preemption
signals, the output_dir lock and full-disk detection (faults.py)."""
