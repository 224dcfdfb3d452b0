"""FedMerge: merge fine-tuned models as one round of federated averaging, and its fixes."""
from . import aggregators as _aggregators  # noqa: F401  (registers every method)
from .errors import MergeError
from .registry import AGGREGATORS, Aggregator, HyperParam

__all__ = ["AGGREGATORS", "Aggregator", "HyperParam", "MergeError"]
