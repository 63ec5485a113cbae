"""What a cache's latents and text conditioning are made with: the weights of each encoder."""

from core.config import config_dataclass


@config_dataclass
class EncoderWeights:
    """A checkpoint for one encoder; None means random init with `seed` (for tiny/small demos), which
    the manifest records."""

    path: str | None = None
    seed: int = 0
