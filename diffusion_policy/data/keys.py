"""Names shared by datasets, policies and encoders: batch keys and observation types."""

# Batch keys: a batch is ``{OBS: {key: (B, To, ...)}, ACTION: (B, T, Da)}``.
OBS = "obs"
ACTION = "action"

# Observation types in ``shape_meta["obs"][key]["type"]``.
LOW_DIM = "low_dim"  # float vectors, normalized by the policy
RGB = "rgb"  # images, kept in their stored dtype and encoded by a vision encoder


def raw_key(key: str) -> str:
    """Where a policy hands an encoder the un-normalized frames of low-dim ``key``."""
    return f"{key}:raw"
