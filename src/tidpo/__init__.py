"""tidpo: Token-Importance Guided Direct Preference Optimization (TI-DPO, ICLR 2026).

Layers (each imports only those below it): core maths (``importance``, ``losses``, ``tokenops``,
``metrics``) < ``models``/``generation`` < ``data`` < ``training`` < ``evaluation``/``tasks`` <
``report`` < ``cli``. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"

__all__ = ["TIDPOConfig", "TIDPOTrainer", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import tidpo.importance` does not pull transformers.Trainer in.
    if name == "TIDPOConfig":
        from tidpo.training.config import TIDPOConfig

        return TIDPOConfig
    if name == "TIDPOTrainer":
        from tidpo.training.trainer import TIDPOTrainer

        return TIDPOTrainer
    raise AttributeError(f"module 'tidpo' has no attribute {name!r}")
