"""DINOv2 ViT (plain, or with register tokens) as a frame encoder: CLS token after the final norm.

One compact ViT, written here, runs both checkpoint formats (the original facebookresearch
state dict, or a Hugging Face folder). The package follows torchtitan's model layout:

* ``model``: the ViT modules (:class:`DinoViT`, :class:`VitShape`);
* ``state_dict_adapter``: reading checkpoints and mapping their keys onto the original names
  (:func:`load_dinov2`, :func:`hf_to_original`, :class:`CheckpointError`);
* ``preprocessing``: uint8 frames -> normalised pixels (:class:`Preprocess`);
* ``encoder``: the ``dinov2`` backbone registered for embedding (:class:`DinoV2Encoder`,
  :class:`DinoV2Backbone`).

Why our own ViT rather than converting everything to HF's model: the reference numbers come from
the original code, whose position-embedding interpolation differs between its model variants
and from HF's plain ``Dinov2Model`` (see ``POS_INTERPOLATIONS``); a compact model states that
choice in one place, caches the interpolated table per patch grid instead of recomputing it
every batch, and runs plain ``scaled_dot_product_attention`` (SDPA) in bf16 without any HF
wrapper. Its numbers are checked against two independent implementations in the tests: the
original reference code (PyPI ``dinov2``) and transformers' models.
"""

from rayrm.backbones.dinov2.encoder import DinoV2Backbone, DinoV2Encoder
from rayrm.backbones.dinov2.model import POS_INTERPOLATIONS, DinoViT, VitShape
from rayrm.backbones.dinov2.preprocessing import NORMALIZATIONS, RESOLUTIONS, Preprocess
from rayrm.backbones.dinov2.state_dict_adapter import (
    CheckpointError,
    hf_to_original,
    infer_shape,
    load_dinov2,
    load_state,
    read_checkpoint,
)

__all__ = [
    "NORMALIZATIONS",
    "POS_INTERPOLATIONS",
    "RESOLUTIONS",
    "CheckpointError",
    "DinoV2Backbone",
    "DinoV2Encoder",
    "DinoViT",
    "Preprocess",
    "VitShape",
    "hf_to_original",
    "infer_shape",
    "load_dinov2",
    "load_state",
    "read_checkpoint",
]
