"""How fast is the fused vocabulary loss at each chunk size, with its buffers cache-hot and cache-cold?

One call of :func:`alambic.losses.vocabulary.fused_vocabulary_loss` (forward and backward) at the bf16 BERT-base step's
shapes: 1,024 rows, d = 768, V = 30,522, a teacher projection, targets on every row, bf16 projections (the
``mixed_precision: bf16`` case). Two settings per chunk size:
- hot: calls back to back, as a loop of the loss alone runs; its chunk buffers (33 MB at the default) stay in the cache;
- streamed: 2 GB of other tensors are swept between calls, as the rest of a training step sweeps its activations.
Printed per chunk size: the median call time of each, and, from torch.profiler, the ``copy_`` time and the weight
gradient's product time per call in each setting.

    python benchmarks/vocabulary_chunks.py                       # 2^23 (the CPU default), 2^21, 2^20 logits per chunk
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logits", type=int, nargs="+", default=[2**23, 2**21, 2**20],
                        help="logits per chunk to compare")
    parser.add_argument("--calls", type=int, default=6, help="timed calls per setting (after one warm-up)")
    parser.add_argument("--other-gb", type=float, default=2.0, help="memory swept between calls when streamed")
    args = parser.parse_args()

    from torch.profiler import profile

    from alambic.engine.host_memory import keep_freed_memory
    from alambic.evaluation.speed import cpu_name
    from alambic.losses import vocabulary

    keep_freed_memory()  # as the engine runs a CPU step
    V, d, N = 30522, 768, 1024
    g = torch.Generator().manual_seed(0)
    student, teacher = (torch.nn.Linear(d, V).bfloat16() for _ in range(2))
    x = torch.randn(N, d, generator=g).bfloat16().requires_grad_()
    x_teacher = torch.randn(N, d, generator=g).bfloat16()
    targets = torch.randint(0, V, (N,), generator=g)
    other = [torch.ones(2**26) for _ in range(max(1, round(args.other_gb * 4)))]  # 256 MB each

    def call():
        loss = vocabulary.fused_vocabulary_loss(x, student, x_teacher, teacher, targets, 2.0, 1 / N, 1 / N)[0]
        loss.backward()
        student.weight.grad = student.bias.grad = x.grad = None

    def run(streamed: bool) -> tuple[float, float, float]:
        times = []
        for i in range(args.calls + 1):
            if streamed:
                for t in other:
                    t.mul_(1.0)
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        if streamed:
            for t in other:
                t.mul_(1.0)
        with profile() as profiler:
            call()
        events = profiler.key_averages()
        copy_ms = sum(e.self_cpu_time_total for e in events if e.key == "aten::copy_") / 1e3
        mm_ms = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm") / 1e3
        return 1e3 * statistics.median(times[1:]), copy_ms, mm_ms

    print(f"machine: {cpu_name()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"{'logits/chunk':>13} {'rows':>5} {'hot ms':>8} {'copy':>6} {'mm':>6} {'streamed ms':>12} {'copy':>6} "
          f"{'mm':>6}")
    for logits in args.logits:
        vocabulary._CHUNK_LOGITS["cpu"] = logits
        hot, streamed = run(False), run(True)
        print(f"{logits:>13,} {vocabulary.default_chunk_rows(V, x.device):>5} {hot[0]:>8.0f} {hot[1]:>6.0f} "
              f"{hot[2]:>6.0f} {streamed[0]:>12.0f} {streamed[1]:>6.0f} {streamed[2]:>6.0f}")


if __name__ == "__main__":
    main()
