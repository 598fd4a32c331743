"""The training recipes: one readable file per stage of docs/method.md, each a `run(cfg, data_dir, run_dir, dist)`
with its loop in view. launcher/train.py picks them by stage name (RECIPES); the rest of launcher/ is the
library they share (distributed set-up, engine, checkpoints, data, metrics, artifacts)."""
