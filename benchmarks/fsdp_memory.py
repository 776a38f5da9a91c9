"""Peak memory per process of DDP and FSDP on a real pair: SmolLM2-135M -> its 15-layer student, two processes.

Under DDP each process holds the whole student, its gradients and both AdamW moments (4 x 81M fp32 values, 1.3 GB)
and the whole teacher; under FSDP each holds half of the student's state, and with ``fsdp_teacher: shard`` half of
the teacher's layers. Each mode runs `alambic distill` for --steps steps (fp32, batch 2 x 128 per process, a
checkpoint at the end) under `torchrun --nproc_per_node 2` (gloo on CPU, NCCL on GPUs); every process reports its
largest resident memory seen after an optimiser step (training: the live state), its peak resident memory
(ru_maxrss: loading included, when every process still holds whole models before they are sharded, and the main
process's gathering of the student for the checkpoint), the bytes it holds of the student's parameters, gradients and
AdamW state and of the teacher's weights (counted tensor by tensor), and the run's training tokens/s.

    python benchmarks/fsdp_memory.py --student runs/offline/student-init --data runs/offline/train.txt \
        --out runs/fsdp-memory

(`benchmarks/offline_teacher.py` builds that student and data; any 15-layer student folder of SmolLM2 does.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc serves blocks above 64 KB with mmap and unmaps them when freed, so resident memory follows the live tensors
(by default freed tensors stay in the heap: sharding's freed full-size copies kept FSDP's RSS above DDP's)."""
MODES = {"ddp": {"distributed": "ddp"}, "fsdp": {"distributed": "fsdp", "fsdp_teacher": "shard"},
         "fsdp, teacher whole": {"distributed": "fsdp", "fsdp_teacher": "replicate"}}


def _local_bytes(tensor) -> int:
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()


def _resident_bytes() -> int:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


def _count_training_state(build_optimizer, counts: dict):
    """``build_optimizer`` that also records, after each optimiser step, the bytes this process holds of the
    student's parameters, gradients and AdamW state (local shards under FSDP)."""
    def build(parameters, cfg):
        optimizer = build_optimizer(parameters, cfg)

        def record(opt, *_):
            params = [p for group in opt.param_groups for p in group["params"]]
            counts["parameters"] = sum(_local_bytes(p) for p in params)
            counts["gradients"] = sum(_local_bytes(p.grad) for p in params if p.grad is not None)
            counts["optimizer"] = sum(_local_bytes(v) for state in opt.state.values() for v in state.values()
                                      if hasattr(v, "numel") and v.numel() > 1)
            counts["training_rss_bytes"] = max(counts.get("training_rss_bytes", 0), _resident_bytes())
        optimizer.register_step_post_hook(record)
        return optimizer
    return build


def worker(args) -> None:
    import alambic
    from alambic.engine import loop, sharding

    counts = {}
    loop.build_optimizer = _count_training_state(loop.build_optimizer, counts)
    shard = sharding.shard

    def shard_and_count(recipe, **kwargs):
        shard(recipe, **kwargs)
        counts["teacher"] = sum(_local_bytes(p) for p in recipe.teacher.parameters())
    sharding.shard = shard_and_count

    cfg = alambic.load_config(overrides=[{
        "teacher": "smollm2-135m", "out": str(args.out / args.mode.replace(", ", "-").replace(" ", "-")),
        "student": {"init": str(args.student)}, "loss": {"alpha_cos": 1.0},
        "data": {"train": [str(args.data)], "max_length": 128},
        "training": {"max_steps": args.steps, "batch_size": 2, "log_every": 1, "save_every": 10**6,
                     "mixed_precision": "no", **MODES[args.mode]},
    }])
    alambic.distill(cfg, progress=False)
    rank = int(os.environ.get("RANK", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"rank": rank, "peak_rss_bytes": peak, **counts}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--mode", choices=list(MODES))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    torchrun = Path(sys.executable).with_name("torchrun")
    rows = {}
    for mode in MODES:
        done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, "--worker", "--mode",
                               mode, "--student", str(args.student), "--data", str(args.data), "--out",
                               str(args.out), "--steps", str(args.steps)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **MALLOC})
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        peaks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')]
        run = args.out / mode.replace(", ", "-").replace(" ", "-")
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows[mode] = {"peaks": sorted(peaks, key=lambda r: r["rank"]),
                      "tokens_per_s": sorted(m["tokens_per_s"] for m in logged)[len(logged) // 2]}
        (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| mode | student params + grads + AdamW per process (MB) | teacher weights per process (MB) | "
          "resident memory while training, per process (GB) | peak resident memory, loading included (GB) | "
          "training tokens/s (2 processes) |\n|---|---:|---:|---:|---:|---:|")
    for mode, row in rows.items():
        def each(fn):
            return " / ".join(fn(r) for r in row["peaks"])

        state = each(lambda r: f"{(r['parameters'] + r['gradients'] + r['optimizer']) / 1e6:.0f}")
        teacher = each(lambda r: f"{r['teacher'] / 1e6:.0f}" if "teacher" in r else "whole")
        training = each(lambda r: f"{r['training_rss_bytes'] / 1e9:.2f}")
        peak = each(lambda r: f"{r['peak_rss_bytes'] / 1e9:.2f}")
        print(f"| {mode} | {state} | {teacher} | {training} | {peak} | {row['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
