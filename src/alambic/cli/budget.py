"""The budget options shared by the verbs that build a student (init-student, distill-task): a speed-up, latency or
size instead of a shape, the conditions that define it, and the bounds of the search."""

from __future__ import annotations

from alambic.errors import AlambicError

TARGETS = ("--target-speedup", "--target-latency", "--target-params")


def add_budget_options(parser, shape_flags: str) -> None:
    group = parser.add_argument_group(
        "a budget instead of a shape (shape search)",
        "Give a budget and alambic picks the student's depth, width, heads and FFN: candidate shapes are timed "
        "against the teacher on this machine (interleaved, cached per machine), and those meeting the budget are "
        "ranked by their divergence from the teacher on the calibration text after slicing. The table of every "
        f"candidate goes to the output and the model card. Give the shape ({shape_flags}) or a budget, not both.")
    group.add_argument("--target-speedup", type=float, metavar="X", help="the student runs X times faster than the "
                       "teacher (a forward at --budget-batch-size x --budget-seq-len)")
    group.add_argument("--target-latency", type=float, metavar="MS", help="a forward of the student takes at most "
                       "MS milliseconds")
    group.add_argument("--target-params", type=float, metavar="N", help="the student has at most N parameters "
                       "(e.g. 20e6)")
    group.add_argument("--budget-batch-size", type=int, default=1, help="batch of the timed forward (default 1, the "
                       "latency of alambic report)")
    group.add_argument("--budget-seq-len", type=int, default=128, help="tokens of the timed forward (default 128)")
    group.add_argument("--budget-device", default="cpu", help="cpu (default) or cuda")
    group.add_argument("--budget-threads", type=int, help="torch CPU threads while timing (default: torch's choice)")
    group.add_argument("--budget-precision", help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    group.add_argument("--budget-seconds", type=float, metavar="S", help="time limit of the timing; shapes left "
                       "are listed as not timed")
    group.add_argument("--search-steps", type=int, default=0, metavar="K",
                       help="distil each shape that meets the budget K steps on the calibration text and rank them "
                       "by their divergence after it (Minitron), instead of as sliced (default 0)")
    group.add_argument("--timing-cache", metavar="DIR", help="folder of the per-machine timing cache (default "
                       "$ALAMBIC_CACHE/shape-timings, ~/.cache/alambic/shape-timings)")


def budget_from_args(args, shape_given: list[str]):
    """The :class:`~alambic.search.Budget` the flags ask for (checked), or None when no target is given; a shape and
    a budget together are refused in one line."""
    from alambic.search import Budget

    targets = {"--target-speedup": args.target_speedup, "--target-latency": args.target_latency,
               "--target-params": args.target_params}
    given = [flag for flag, value in targets.items() if value is not None]
    if not given:
        if args.search_steps:
            raise AlambicError("--search-steps ranks the shapes of a shape search: add --target-speedup, "
                               "--target-latency or --target-params, or drop --search-steps")
        if args.budget_seconds is not None:
            raise AlambicError("--budget-seconds bounds a shape search: add --target-speedup, --target-latency or "
                               "--target-params, or drop --budget-seconds")
        return None
    if args.budget_seconds is not None and args.budget_seconds <= 0:
        raise AlambicError(f"--budget-seconds must be positive, got {args.budget_seconds:g}")
    if shape_given:
        raise AlambicError(f"give the student's shape or a budget, not both: drop {shape_given[0]} (the search "
                           f"chooses it for {given[0]}) or drop {given[0]}")
    return Budget(speedup=args.target_speedup, latency_ms=args.target_latency,
                  params=None if args.target_params is None else int(args.target_params),
                  batch_size=args.budget_batch_size, seq_len=args.budget_seq_len, device=args.budget_device,
                  threads=args.budget_threads, precision=args.budget_precision).check()
