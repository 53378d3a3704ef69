"""Training layer: `TIDPOConfig` (config.py) and `TIDPOTrainer` (trainer.py)."""
