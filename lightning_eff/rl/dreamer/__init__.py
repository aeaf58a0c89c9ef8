"""DreamerV3 building blocks: the math (plain functions on tensors) and the networks.

Paper: D. Hafner et al., "Mastering Diverse Domains through World Models", arXiv 2301.04104.
"""

from lightning_eff.rl.dreamer import functional
from lightning_eff.rl.dreamer.functional import *  # noqa: F403  (the math: the names of functional.__all__)
from lightning_eff.rl.dreamer.networks import MLP, RSSM, ChannelNorm, Decoder, DreamerMLP, Encoder, RSSMState

__all__ = ["RSSM", "RSSMState", "DreamerMLP", "MLP", "ChannelNorm", "Encoder", "Decoder"]
__all__ += functional.__all__
