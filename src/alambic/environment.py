"""What alambic reads from environment variables: on / off switches (``ALAMBIC_DEBUG``, ``ALAMBIC_CPU_BF16``, ...)
and, under a launcher (torchrun, ``accelerate launch``), which process this is.

Every switch is read the same way: case-insensitive ``1 / true / yes / on`` and ``0 / false / no / off``; unset or
empty means "not set". Any other value is refused in one line rather than guessed at: ``ALAMBIC_CPU_BF16=False``
once turned bf16 *on*.
"""

from __future__ import annotations

import os

from alambic.errors import AlambicError

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def env_switch(name: str) -> bool | None:
    """True or False when the variable ``name`` is set to a switch word, None when it is unset or empty."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    value = raw.strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    raise AlambicError(f"{name}={raw!r} is not an on/off value: set it to one of {', '.join(ON + OFF)}, "
                       f"or unset it")


def launched_rank() -> tuple[int, int]:
    """This process's rank and the number of processes, as the launcher set them (``RANK``, ``WORLD_SIZE``); (0, 1)
    without one. Readable before any process group exists, e.g. to let one process write a file the others read."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Whether this process is the one that writes the run's shared files and prints (rank 0, or the only one)."""
    return launched_rank()[0] == 0


MULTI_PROCESS_VERBS = ("distill", "finetune", "cache-teacher")
"""The verbs that share their work among a launcher's processes; every other verb would have each process write
the same outputs (a generated file in prompt order, a report, an export, a staged task run)."""


def require_one_process(verb: str) -> None:
    """Refuse ``verb`` under a launcher that started several processes, unless it is one of
    :data:`MULTI_PROCESS_VERBS`."""
    if verb not in MULTI_PROCESS_VERBS and launched_rank()[1] > 1:
        raise AlambicError(f"{verb} runs in one process (only {', '.join(MULTI_PROCESS_VERBS)} use several): launch "
                           "it without torchrun / accelerate launch")
