"""``rayrm serve`` as a Ray job: deploy the reward model on the cluster and return.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/serve.py --config configs/serve.yaml --serve.checkpoint s3://.../checkpoint_x

The application keeps running on the cluster after the job ends (``serve.detach``); stop it
with ``serve shutdown`` or ``serve.delete("rayrm")``. Clients reach it over HTTP at the head
node's ``serve.host:serve.port`` or, inside the cluster, through ``RewardClient()``.
"""

import sys

from rayrm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--serve.detach", "true", *sys.argv[1:]]))
