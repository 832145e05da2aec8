"""Fault injection for the reliability tests: ``ROUTETUNE_FAULT="after_step:12"`` kills the
process with SIGKILL right after step 12; ``in_write:10`` kills it while the files of step 10's
checkpoint are being written (the weights are, the optimizer state is not); ``in_checkpoint:10``
once they are all written and fsynced, before the folder is renamed into place;
``disk_full:10`` makes the write of step 10's checkpoint fail as a full disk does (ENOSPC). Unset
(the normal case), this does nothing."""

from __future__ import annotations

import errno
import os
import signal


def maybe_kill(point: str, step: int) -> None:
    spec = os.environ.get("ROUTETUNE_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        name, _, at = item.partition(":")
        if name == point and at.isdigit() and int(at) == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if name == "disk_full" and point == "in_write" and at.isdigit() and int(at) == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
