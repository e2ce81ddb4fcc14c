#!/usr/bin/env python
"""Train a Recurrent Memory Transformer with DeepSpeed: rmt_scale/cli/train.py, also installed as `rmt-train`.

    python launchers/train.py --help
    deepspeed --num_gpus 2 launchers/train.py --ds_config ds_configs/zero3.json ...

Exit codes: 0 done; 2 bad configuration or path (nothing was started); 65 corrupt training data; 74 disk full while
checkpointing (free space, then --resume auto); 75 stopped by a signal after writing a checkpoint (rerun with
--resume auto); 1 any other error.
"""

import sys

from rmt_scale.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
