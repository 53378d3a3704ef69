"""Run `tidpo train` (argv after the first argument) and SIGKILL this process in the middle of saving
the checkpoint of step ``sys.argv[1]``: after the weights and optimizer state are written, before the
RNG and trainer state. A real crash at the worst moment, not a simulated one.
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import Trainer

from tidpo.cli import main
from tidpo.training.trainer import TIDPOTrainer

KILL_AT_STEP = int(sys.argv[1])


def _save_rng_state_or_die(self: TIDPOTrainer, output_dir: str) -> None:
    if self.state.global_step == KILL_AT_STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    Trainer._save_rng_state(self, output_dir)


TIDPOTrainer._save_rng_state = _save_rng_state_or_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
