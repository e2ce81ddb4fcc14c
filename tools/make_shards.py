#!/usr/bin/env python
"""Write webdataset tar shards of long-context task samples: rmt_scale/cli/make_shards.py, also installed as
`rmt-make-shards`.

    python tools/make_shards.py --task memorize --tokens 1000000 --samples 8 --out data/memorize-1m
"""

import sys

from rmt_scale.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
