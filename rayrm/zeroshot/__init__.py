"""Progress without a trained reward model: a pretrained VLM asked about raw episodes.

Beside the trained path (embed -> annotate -> train -> evaluate/score/serve), these read the
raw episodes directly and need no embeddings or checkpoint of ours: ``gvl`` (Qwen3-VL shown
one successful demonstration in context, ``rayrm gvl``). They are baselines to compare the
trained reward model with, not backbones: they give progress, not embeddings.
"""
