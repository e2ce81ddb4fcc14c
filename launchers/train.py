#!/usr/bin/env python
"""Train a Recurrent Memory Transformer with DeepSpeed. Run with --help for every flag.

    python launchers/train.py                                   # 1 process, embedded default
    deepspeed --num_gpus 2 launchers/train.py --ds_config ds_configs/zero3.json ...
    srun python launchers/train.py ...   # with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT exported
    mpirun -np 2 python launchers/train.py ...   # or srun --mpi=pmi2: ranks found through MPI (mpi4py)

The process restarts itself first under the CPU allocator of rmt_scale/runtime/allocator.py: jemalloc when installed
(RMT_ALLOCATOR=auto|jemalloc|glibc chooses).

Exit codes: 0 done; 2 bad configuration or path (nothing was started); 65 corrupt training data (a checkpoint
was written if a step trained since the last one); 75 stopped by SIGUSR1/SIGTERM after writing a checkpoint
(rerun with --resume auto).
"""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    # First of all, as it starts the process over: under jemalloc when installed (RMT_ALLOCATOR=glibc keeps
    # glibc), whose RSS stays flat over a long step's segments where glibc's grows. Run from its file: the
    # package would import torch before the restart.
    runpy.run_path(os.path.join(ROOT, "rmt_scale", "runtime", "allocator.py"))["restart_launcher"]()

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, ROOT)

from rmt_scale.training import signals  # noqa: E402
from rmt_scale.runtime.device import select_accelerator  # noqa: E402

signals.install()  # before the slow start-up, so an early SIGUSR1/SIGTERM is kept, not fatal
select_accelerator()  # DS_ACCELERATOR=cpu without CUDA, before anything imports deepspeed

from rmt_scale.training import EXIT_DATA_ERROR, EXIT_PREEMPTED, DataError, Preempted, parse_args, run  # noqa: E402
from rmt_scale.training.distributed import close_distributed  # noqa: E402


def main() -> int:
    try:
        config = parse_args()
        run(config)
        status = 0
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        status = EXIT_DATA_ERROR
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        status = 2
    except Preempted:
        status = EXIT_PREEMPTED
    close_distributed(wait_for_peers=status == 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
