"""What users do with a built index beyond top-k: self-influence (data cleaning) and
cosine-normalised score modes. Everything here reads the stored sketches; no gradient is
recomputed."""
from .self_influence import rank_self_influence, self_influence

__all__ = ["self_influence", "rank_self_influence"]
