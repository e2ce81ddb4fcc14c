"""Train a Recurrent Memory Transformer with DeepSpeed. Run with --help for every flag.

    python launchers/train.py                                   # 1 process, embedded default (or: rmt-train)
    deepspeed --num_gpus 2 launchers/train.py --ds_config ds_configs/zero3.json ...
    srun python launchers/train.py ...   # with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT exported
    mpirun -np 2 python launchers/train.py ...   # or srun --mpi=pmi2: ranks found through MPI (mpi4py)

The process restarts itself first under the CPU allocator of rmt_scale/runtime/allocator.py: jemalloc when installed
(RMT_ALLOCATOR=auto|jemalloc|glibc chooses).

Exit codes: 0 done; 2 bad configuration or path (a ConfigError: nothing was started; --out_dir in use by another
run included); 3 the run diverged (--max_nonfinite_steps steps in a row had a non-finite loss: their updates were
skipped, a checkpoint written); 65 corrupt training data (a checkpoint was written if a step trained since the last
one); 74 the disk filled up while a checkpoint was written (the partial one is removed; free space, then --resume
auto); 75 stopped by SIGUSR1/SIGTERM/SIGINT after writing a checkpoint (rerun with --resume auto). Any other error is
a bug or a failure of the run: its traceback, exit code 1.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from ..runtime.allocator import restart_launcher

EXIT_CONFIG_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    """The program: it may start the process over (below), so call it as a process's main, not from a running
    program (there, ``rmt_scale.training.run(TrainConfig(...))`` is the same thing)."""
    # First of all, as it starts the process over: under jemalloc when installed (RMT_ALLOCATOR=glibc keeps
    # glibc), whose RSS stays flat over a long step's segments where glibc's grows. Only rmt_scale.runtime is
    # imported before it: the rest of the package imports torch.
    restart_launcher()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed's warmup schedulers warn, as they are built at every start, that a learning rate was asked of them
    # "before it has started": their own constructor asks it
    logging.getLogger("DeepSpeed").addFilter(lambda record: "before it has started" not in record.getMessage())
    from ..training import signals

    signals.install()  # before the slow start-up, so an early SIGUSR1/SIGTERM is kept, not fatal
    from ..runtime.device import select_accelerator

    select_accelerator()  # DS_ACCELERATOR=cpu without CUDA, before anything imports deepspeed
    from ..training import parse_args, run
    from ..training.distributed import close_distributed

    status = exit_status(lambda: run(parse_args(argv)))
    close_distributed(wait_for_peers=status == 0)
    return status


def exit_status(job: Callable[[], object]) -> int:
    """Runs ``job`` and returns the launcher's exit code: 0, ``EXIT_CONFIG_ERROR`` after a ConfigError,
    ``EXIT_DATA_ERROR`` after a DataError, ``EXIT_DIVERGED`` after a run whose loss stayed non-finite,
    ``EXIT_DISK_FULL`` after a DiskFull (each printed in one line), ``EXIT_PREEMPTED`` after a stop signal. Anything
    else (a ValueError from inside the run included) propagates with its traceback."""
    from ..model.config import ConfigError
    from ..training import (
        EXIT_DATA_ERROR,
        EXIT_DISK_FULL,
        EXIT_DIVERGED,
        EXIT_PREEMPTED,
        DataError,
        DiskFull,
        Diverged,
        Preempted,
    )

    codes = {
        ConfigError: EXIT_CONFIG_ERROR,
        DataError: EXIT_DATA_ERROR,
        Diverged: EXIT_DIVERGED,
        DiskFull: EXIT_DISK_FULL,
    }
    try:
        job()
    except tuple(codes) as error:
        print(f"error: {error}", file=sys.stderr)
        return next(code for kind, code in codes.items() if isinstance(error, kind))
    except Preempted:
        return EXIT_PREEMPTED
    return 0
