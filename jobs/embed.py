"""``rayrm embed`` as a Ray job (how rayrm reaches the cluster: see jobs/pipeline.py).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/embed.py --config configs/cluster_8gpu.yaml [--section.key value ...]
"""

import sys

from rayrm.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
