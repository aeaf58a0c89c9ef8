"""DreamerV3 building blocks: the math (plain functions on tensors) and the networks.

Paper: D. Hafner et al., "Mastering Diverse Domains through World Models", arXiv 2301.04104.
"""

from lightning_eff.rl.dreamer.functional import (
    ReturnNormalizer,
    kl_balance_loss,
    lambda_returns,
    symexp,
    symlog,
    twohot_decode,
    twohot_encode,
    unimix_logits,
)
from lightning_eff.rl.dreamer.networks import MLP, RSSM, ChannelNorm, Decoder, DreamerMLP, Encoder, RSSMState

__all__ = [
    "symlog",
    "symexp",
    "twohot_encode",
    "twohot_decode",
    "lambda_returns",
    "kl_balance_loss",
    "unimix_logits",
    "ReturnNormalizer",
    "RSSM",
    "RSSMState",
    "DreamerMLP",
    "MLP",
    "ChannelNorm",
    "Encoder",
    "Decoder",
]
