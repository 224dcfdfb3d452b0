"""FedMerge: merge fine-tuned models as one round of federated averaging, and its fixes.

Public API: `AGGREGATORS` (the registry, keyed by method name), `merge_state_dicts` (plain
dicts of tensors), and the pieces the CLI and the app are built from.
"""
from . import aggregators as _aggregators  # noqa: F401  (registers every method)
from .checkpoints import Checkpoint, StateDict
from .config import MergeConfig, load_config, parse_config
from .engine import merge_state_dicts, merge_to_dir
from .errors import MergeError
from .live import LiveModel, TaskVectorStack
from .plan import plan_from_config, plan_from_objects
from .registry import AGGREGATORS, Aggregator, HyperParam
from .similarity import SimilarityReport, similarity
from .task_vectors import FullFinetune, LoraAdapter, load_source

__all__ = [
    "AGGREGATORS", "Aggregator", "Checkpoint", "FullFinetune", "HyperParam", "LiveModel", "LoraAdapter",
    "MergeConfig", "MergeError", "SimilarityReport", "StateDict", "TaskVectorStack", "load_config", "load_source",
    "merge_state_dicts", "merge_to_dir", "parse_config", "plan_from_config", "plan_from_objects", "similarity",
]
