"""`ray job submit --working-dir . -- python jobs/evaluate.py --config configs/<x>.yaml [--a.b v]`

Same as `rayrm evaluate`: parse the config, connect to the cluster (RAY_ADDRESS, set by
`ray job submit`), run. Exits non-zero on failure so the job is reported as failed.
"""

import sys

from rayrm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
