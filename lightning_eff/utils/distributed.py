"""Clean shutdown of a ``gloo`` process group.

Lightning registers ``destroy_process_group`` at exit only for NCCL. A gloo group left to the interpreter's
finalisation tears its worker threads down in whichever order the C++ statics go, and a ``ddp_spawn``
worker then sometimes aborts after its work is done ("terminate called without an active exception",
the parent sees ``process 1 terminated with signal SIGABRT``). :func:`destroy_process_group_at_exit`
registers, once per process, an exit handler that waits (bounded) for the other ranks and destroys the
group while the interpreter is still whole.

Every ``LightningModule`` of the library gets this from one place, :class:`ProcessGroupCleanup`: a mixin
whose ``setup`` (Lightning calls it in every process, after the strategy has initialised the group)
registers the handler. A module that overrides ``setup`` calls ``super().setup(stage)``.
"""

from __future__ import annotations

import atexit
import datetime

import torch.distributed as dist

__all__ = ["ProcessGroupCleanup", "destroy_process_group_at_exit"]

_REGISTERED = False
_BARRIER_TIMEOUT = datetime.timedelta(seconds=30)


def _destroy() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":  # every rank reaches its exit: leave together (bounded wait)
            dist.monitored_barrier(timeout=_BARRIER_TIMEOUT, wait_all_ranks=True)
    except Exception:  # noqa: BLE001 - a rank that died must not keep this one from exiting
        pass
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group at interpreter exit (idempotent; no-op without one)."""
    global _REGISTERED
    if _REGISTERED or not (dist.is_available() and dist.is_initialized()):
        return
    atexit.register(_destroy)
    _REGISTERED = True


class ProcessGroupCleanup:
    """``LightningModule`` mixin: ``setup`` registers :func:`destroy_process_group_at_exit` in every process.

    List it before ``L.LightningModule``::

        class MyModule(ProcessGroupCleanup, L.LightningModule):
            def setup(self, stage: str) -> None:
                super().setup(stage)
                ...
    """

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()
        super().setup(stage)
