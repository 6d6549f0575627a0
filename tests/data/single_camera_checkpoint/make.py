"""Made with rayrm at 724a04b (before several cameras): a tiny single-camera checkpoint and
the outputs it gave, for tests/test_model_views.py."""

import sys

import numpy as np
import torch

from rayrm.config import ModelConfig
from rayrm.train.checkpoint import save_checkpoint
from rayrm.train.model import RewardTransformer

out = sys.argv[1]
cfg = ModelConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64, head_hidden=16, max_seq_len=8)
torch.manual_seed(0)
model = RewardTransformer(cfg, 6, 4)
g = torch.Generator().manual_seed(5)
model.set_input_stats(
    torch.randn(6, generator=g),
    torch.rand(6, generator=g) + 0.5,
    torch.randn(4, generator=g),
    torch.rand(4, generator=g) + 0.5,
)
model.eval()
save_checkpoint(out, model, {"step": 1, "backbone": {"name": "tiny"}})
visual = torch.randn(3, 8, 6, generator=g)
language = torch.randn(3, 4, generator=g)
with torch.no_grad():
    progress = model(visual, language)
np.savez(
    f"{out}/expected.npz",
    visual=visual.numpy(),
    language=language.numpy(),
    progress=progress.numpy(),
)
print(progress)
