"""Run under torchrun by tests/test_distributed.py: the main process stops on a user error (one line, exit 2) before a
barrier the other process is already waiting at."""

import sys

from alambic.cli import main
from alambic.config import TrainingConfig
from alambic.engine.loop import make_accelerator

accelerator, _ = make_accelerator(TrainingConfig(mixed_precision="no"))
if accelerator.is_main_process:
    sys.exit(main(["distill", "--teacher", "no-such-teacher", "--data", sys.argv[1], "--out", sys.argv[2]]))
accelerator.wait_for_everyone()  # never released: the main process is gone
print("released", flush=True)
