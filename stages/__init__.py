"""Würstchen's three stages and the semantic compressor, in plain PyTorch.

Nothing here imports Ray or MLflow: data prep, training and consumers all build on these modules.
"""

from stages.semantic_compressor import SemanticCompressor, SemanticCompressorConfig
from stages.stage_a import StageA, StageAConfig
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig
from stages.state_dicts import CheckpointMismatchError

MODELS = {"stage_c": StageC, "stage_b": StageB, "stage_a": StageA, "semantic_compressor": SemanticCompressor}

__all__ = [
    "MODELS",
    "CheckpointMismatchError",
    "SemanticCompressor",
    "SemanticCompressorConfig",
    "StageA",
    "StageAConfig",
    "StageB",
    "StageBConfig",
    "StageC",
    "StageCConfig",
]
