"""Pure tensor functions shared by the cacher and the pruner: no state, no modules."""

from stc.core.selection import dynamic_token_count, select_changed_tokens
from stc.core.similarity import token_similarity

__all__ = ["dynamic_token_count", "select_changed_tokens", "token_similarity"]
