"""On / off switches read from environment variables (``ALAMBIC_DEBUG``, ``ALAMBIC_CPU_BF16``, ...).

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
