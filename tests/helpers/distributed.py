"""Two real processes on CPU (gloo) for the multi-process tests, with a process-group timeout and a launch deadline."""

from __future__ import annotations

import os
import time
from datetime import timedelta

PROCESS_GROUP_TIMEOUT_S = 60  # a collective waiting longer than this on the other rank raises
LAUNCH_DEADLINE_S = 120  # both processes must have finished by then; the test fails instead of hanging


class _Rank:
    """What `PrepareForLaunch(function, debug=True)` does in each forked process, with a process-group timeout.

    accelerate's debug launch initialises the process group itself, before any `Accelerator` (whose
    `InitProcessGroupKwargs` then never reach it), with gloo's default timeout of 30 minutes.
    """

    def __init__(self, function, timeout_s: float) -> None:
        self.function, self.timeout_s = function, timeout_s

    def __call__(self, index: int, *args) -> None:
        import torch.distributed as dist

        store = dist.FileStore(os.environ["ACCELERATE_DEBUG_RDV_FILE"], 2)
        dist.init_process_group(
            "gloo", rank=index, world_size=2, store=store, timeout=timedelta(seconds=self.timeout_s)
        )
        os.environ["FORK_LAUNCHED"] = "1"
        self.function(*args)


def launch_two_processes(
    function,
    args: tuple,
    store_file: str,
    deadline_s: float = LAUNCH_DEADLINE_S,
    timeout_s: float = PROCESS_GROUP_TIMEOUT_S,
) -> None:
    """`accelerate.debug_launcher(function, args, num_processes=2)` with the rendezvous file at `store_file`.

    Args:
        function: Runs in each process, after the process group is up.
        args: Its arguments.
        store_file: The rendezvous file.
        deadline_s: Both processes must have ended by then; they are killed otherwise.
        timeout_s: The process group's timeout: a collective that waits longer on the other rank raises.

    Raises:
        TimeoutError: The processes were still running after `deadline_s` seconds (they are killed first).
        torch.multiprocessing.ProcessRaisedException: A process raised (the other one is terminated).
    """
    from accelerate.utils import patch_environment
    from torch.multiprocessing import start_processes

    with patch_environment(
        world_size=2,
        master_addr="127.0.0.1",
        master_port="29500",
        accelerate_mixed_precision="no",
        accelerate_debug_rdv_file=store_file,
        accelerate_use_cpu="yes",
        gloo_socket_ifname="lo",
    ):
        context = start_processes(_Rank(function, timeout_s), args=args, nprocs=2, start_method="fork", join=False)
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(10)
            raise TimeoutError(
                f"The 2-process run did not finish within {deadline_s:.0f} s (a rank hung, e.g. in a gloo collective "
                "or at exit); both processes were killed."
            )
