"""Stage annotation: videos to label from (``videos``) and labels onto the shards (``labels``).

Submodules are imported where used, so ``rayrm annotate`` does not load video code and
``rayrm annotate-video`` does not load Parquet writing.
"""
