"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: a 4-step DDP (or, with a third argument
``fsdp``, FSDP; a fourth, the training precision) run straight through, and the same run interrupted during step 3 (on every process, after the
checkpoint of step 2) and resumed. The runs are
tests/test_engine.py's; the tiny BERT student keeps its dropout, so each process's RNG state matters for an exact
resume."""

import sys
from pathlib import Path

from alambic.engine.loop import train
from test_engine import Interrupt, make_run


def main(text_dir: str, out: Path, distributed: str = "ddp", precision: str = "no") -> None:
    run = dict(family="masked", text_dir=text_dir, max_steps=4, save_every=2, distributed=distributed,
               mixed_precision=precision)
    recipe, batches, cfg, tokenizer = make_run(**run)
    train(recipe, batches, cfg, out / "straight", tokenizer=tokenizer, progress=False)

    recipe, batches, cfg, tokenizer = make_run(**run)
    processes = 2

    def interrupted(index):
        if index >= 2 * processes * cfg.grad_accum:  # every process dies fetching step 3's batch
            raise Interrupt
        return batches(index)

    try:
        train(recipe, interrupted, cfg, out / "resumed", tokenizer=tokenizer, progress=False)
    except Interrupt:
        pass
    else:
        sys.exit("the interrupted run was not interrupted")
    recipe, batches, cfg, tokenizer = make_run(**run)
    train(recipe, batches, cfg, out / "resumed", tokenizer=tokenizer, resume=True, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
