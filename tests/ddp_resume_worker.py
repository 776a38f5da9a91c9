"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: a 4-step DDP run straight through, and the
same run interrupted during step 3 (on every process, after the checkpoint of step 2) and resumed. The tiny BERT
student keeps its dropout, so each process's RNG state matters for an exact resume."""

import sys
from pathlib import Path

from alambic.config import DataConfig, TrainingConfig
from alambic.data.pipeline import training_batches
from alambic.engine.loop import train
from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe
from alambic.students import init_student
from tiny import tiny_bert, wordpiece_tokenizer


class Interrupt(Exception):
    pass


def make_run(text_dir: str):
    teacher, tokenizer = tiny_bert(), wordpiece_tokenizer()
    student = init_student(teacher, layers="every-other").model.train()
    cfg = TrainingConfig(max_steps=4, batch_size=2, lr=1e-3, log_every=1, save_every=2, seed=0)
    loss = DistilBERTLossConfig()
    batches = training_batches([text_dir], tokenizer, "masked", DataConfig(train=[text_dir], max_length=32), loss,
                               cfg.batch_size, cfg.seed)
    return DistilBERTRecipe(teacher, student, loss), batches, cfg, tokenizer


def main(text_dir: str, out: Path) -> None:
    recipe, batches, cfg, tokenizer = make_run(text_dir)
    train(recipe, batches, cfg, out / "straight", tokenizer=tokenizer, progress=False)

    recipe, batches, cfg, tokenizer = make_run(text_dir)
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
    recipe, batches, cfg, tokenizer = make_run(text_dir)
    train(recipe, batches, cfg, out / "resumed", tokenizer=tokenizer, resume=True, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
