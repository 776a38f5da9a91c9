"""What does fusing the vocabulary losses save? Soft-target KL + cross-entropy on N rows of a V-word vocabulary,
forward + backward, three ways in one run:

- separate ops: the projections, then :func:`alambic.losses.soft_target_kl` and :func:`token_cross_entropy` on the
  full (N, V) logits, autograd through all of it (alambic's step before the fused loss);
- fused: :func:`alambic.losses.vocabulary.fused_vocabulary_loss` (chunks of rows, closed-form gradients);
- matmuls only: the four matrix products both must do (teacher and student projections, the two gradient
  products), with nothing else: the floor.

    python benchmarks/vocabulary_loss.py                      # the encoder step's shape: 1,024 x 30,522, d 384
    python benchmarks/vocabulary_loss.py --vocab 49152 --hidden 576 --rows 512

Prints the median seconds of each, and the largest difference of the fused loss and gradients from the separate ops.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from alambic.losses import soft_target_kl, token_cross_entropy
from alambic.losses.vocabulary import fused_vocabulary_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="rows (tokens) with soft targets (default 1024)")
    parser.add_argument("--targets", type=int, default=150, help="rows with a hard target too (default 150: 15%%)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    N, d, V, T = args.rows, args.hidden, args.vocab, args.temperature
    x0, xt = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)
    student, teacher = torch.nn.Linear(d, V), torch.nn.Linear(d, V).requires_grad_(False)
    with torch.no_grad():
        student.weight.normal_(0, 0.05, generator=g)
        teacher.weight.normal_(0, 0.05, generator=g)
    targets = torch.full((N,), -100)
    targets[torch.randperm(N, generator=g)[: args.targets]] = torch.randint(0, V, (args.targets,), generator=g)
    kd_weight, ce_weight = 5.0 / N, 2.0 / args.targets

    def separate(x):
        logits = student(x)
        with torch.no_grad():
            teacher_logits = teacher(xt)
        kept = targets != -100
        return (kd_weight * soft_target_kl(logits, teacher_logits, T, num_items=1)
                + ce_weight * token_cross_entropy(logits[kept], targets[kept], num_items=1))

    def fused(x):
        return fused_vocabulary_loss(x, student, xt, teacher, targets, T, kd_weight, ce_weight)[0]

    upstream = torch.randn(N, V, generator=g)

    def matmuls_only():
        with torch.no_grad():
            teacher(xt)
            student(x0)
            upstream @ student.weight
            upstream.t() @ x0

    def timed(step):
        times, result = [], None
        for _ in range(args.repeats + 1):  # the first is a warm-up
            student.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_()
            start = time.perf_counter()
            loss = step(x) if step is not matmuls_only else step()
            if loss is not None:
                loss.backward()
            times.append(time.perf_counter() - start)
            result = (loss, x.grad, student.weight.grad)
        return statistics.median(times[1:]), result

    print(f"{N} rows x {V} vocabulary, hidden {d}, {args.targets} hard targets, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    separate_s, (separate_loss, separate_x, separate_w) = timed(separate)
    fused_s, (fused_loss, fused_x, fused_w) = timed(fused)
    floor_s, _ = timed(matmuls_only)
    print(f"{'separate ops':<14}{separate_s:>8.3f} s")
    print(f"{'fused':<14}{fused_s:>8.3f} s   ({separate_s / fused_s:.2f}x faster)")
    print(f"{'matmuls only':<14}{floor_s:>8.3f} s   (the floor: separate ops spend {separate_s - floor_s:.3f} s "
          f"beyond it, fused {fused_s - floor_s:.3f} s)")
    print(f"fused vs separate: loss {abs(float(fused_loss.detach()) - float(separate_loss.detach())):.2e}, "
          f"input grad {(fused_x - separate_x).abs().max():.2e}, weight grad {(fused_w - separate_w).abs().max():.2e}")


if __name__ == "__main__":
    main()
