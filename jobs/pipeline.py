"""embed -> train -> evaluate as a Ray job: the same as ``rayrm pipeline``.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pipeline.py --config configs/cluster_8gpu.yaml [--train.lr 3e-4 ...]

``--working-dir .`` is how rayrm reaches the cluster: Ray unpacks the repository on every node
and puts it first on ``PYTHONPATH`` of this driver and of every task, actor and Train worker of
the job (the nodes need rayrm's dependencies installed, not rayrm). The driver joins the
cluster through ``RAY_ADDRESS``, which ``ray job submit`` sets; its log and the workers' logs
stream back to ``ray job submit``. A failure exits non-zero (2 for bad inputs), so the job is
reported FAILED and ``ray job submit`` exits 1.
"""

import sys

from rayrm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
