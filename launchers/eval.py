#!/usr/bin/env python
"""Evaluate an exported RMT by input length: rmt_scale/cli/eval.py, also installed as `rmt-eval`.

python launchers/eval.py --model runs/quickstart/export --eval_segments 1 4 16 64
"""

import sys

from rmt_scale.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
