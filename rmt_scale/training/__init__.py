"""Training with DeepSpeed: config, curriculum, data, loop, evaluation by length, checkpoints, export.

Parallelism stays here; the model code knows nothing of DeepSpeed beyond gathering a ZeRO-3 partitioned
embedding. ``launchers/train.py`` is the command line; :func:`run` is the same thing from Python.
"""

from .batches import DataError
from .checkpoint import DiskFull
from .config import TrainConfig, build_parser, parse_args
from .curriculum import Curriculum
from .ds_config import build_ds_config, load_ds_config
from .evaluation import evaluate_by_length, streaming_correct
from .experiment import format_table, run
from .trainer import EXIT_DATA_ERROR, EXIT_DISK_FULL, EXIT_DIVERGED, EXIT_PREEMPTED, Diverged, Preempted, Trainer
