"""Per-frame rewards for whole datasets (``rayrm score``) and what is derived from them."""
