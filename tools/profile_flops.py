#!/usr/bin/env python
"""FLOP, time and memory scaling report, RMT against full attention: rmt_scale/cli/profile_flops.py, also
installed as `rmt-profile-flops`. Exit status 1 when RMT's cost grows faster than the limits allow.

    python tools/profile_flops.py --quick --out /tmp/profile
"""

import sys

from rmt_scale.cli.profile_flops import main

if __name__ == "__main__":
    sys.exit(main())
