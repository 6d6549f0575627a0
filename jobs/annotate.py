"""`ray job submit --working-dir . -- python jobs/annotate.py [video] --config configs/<x>.yaml`

Stage annotation on a cluster, same as the CLI: with `video` first, `rayrm annotate-video`
(numbered mp4s and contact sheets, one Ray task per episode); otherwise `rayrm annotate` (the
stage JSON `annotate.stages` onto the shards `annotate.embeddings`). Exits non-zero on failure.
"""

import sys

from rayrm.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    command = "annotate"
    if args and args[0] == "video":
        command, args = "annotate-video", args[1:]
    sys.exit(main([command, *args]))
