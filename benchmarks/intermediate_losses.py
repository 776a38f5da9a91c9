"""Step overhead of attention and relation losses vs hidden states only (TinyBERT / MiniLM recipes).

    python benchmarks/intermediate_losses.py                     # MiniLM-L6 -> 4 x 312 (TinyBERT-4 shape), 16 x 128

One full training step each (teacher forward under inference_mode with hooks, student forward and backward, AdamW),
same batches, timed after warm-up; the median step of each setup and its ratio to hidden-states-only, all in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from alambic.config import DataConfig
from alambic.data.pipeline import training_batches
from alambic.modeling import model_kind
from alambic.recipes.minilm import MiniLMLossConfig, MiniLMRecipe
from alambic.recipes.tinybert import TinyBERTLossConfig, TinyBERTRecipe
from alambic.students import init_student
from alambic.teachers import load_teacher

SETUPS = {
    "hidden only (embedding + hidden MSE)": (TinyBERTRecipe, TinyBERTLossConfig(layer_map="0:0,1:2,2:3,3:5,4:6", alpha_attention=0)),
    "tinybert (+ attention scores MSE)": (TinyBERTRecipe, TinyBERTLossConfig(layer_map="0:0,1:2,2:3,3:5,4:6")),
    "minilm (Q-Q, K-K, V-V relations, last layer)": (MiniLMRecipe, MiniLMLossConfig(relation_heads=12)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="minilm-l6")
    parser.add_argument("--data", default="bbc-news:train")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    teacher, tokenizer = load_teacher(args.teacher)
    batches = training_batches([args.data], tokenizer, model_kind(teacher), DataConfig(max_length=args.seq_len), None,
                               args.batch_size, seed=0)
    print(f"teacher {args.teacher}, student 4 x 312 (FFN 1200, 12 heads), batch {args.batch_size} x {args.seq_len}, "
          f"median of {args.steps} steps after 1 warm-up; torch {torch.__version__}, {torch.get_num_threads()} threads")
    medians = {}
    for name, (recipe_class, loss_cfg) in SETUPS.items():
        torch.manual_seed(0)
        student = init_student(teacher, layers="linspace:4", hidden_size=312, intermediate_size=1200, num_heads=12).model
        recipe = recipe_class(teacher, student.train(), loss_cfg)
        optimizer = torch.optim.AdamW(recipe.objective.parameters(), lr=1e-4)
        times = []
        for i in range(args.steps + 1):
            batch = batches(i)
            start = time.perf_counter()
            counts = {k: torch.tensor(float(v)) for k, v in recipe.row_counts(batch).items()}
            loss, _ = recipe.objective(batch, recipe.teacher_targets(batch), counts)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times[1:])
    base = next(iter(medians.values()))
    for name, seconds in medians.items():
        print(f"{name:<48} {seconds:6.3f} s/step  {seconds / base:5.2f}x")


if __name__ == "__main__":
    main()
