"""STC-Pruner: saliency scoring against a frame anchor and a temporal anchor."""

from stc.pruner.pruner import PrunedTokens, STCPruner

__all__ = ["PrunedTokens", "STCPruner"]
