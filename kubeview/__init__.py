"""The live source of the budget view: list+watch of Nodes, Pods, Deployments and InferenceModels.

This is the Kubernetes adapter the architecture places beside `budget/`: it imports the kubernetes
client so that `budget/` never has to. It keeps the raw objects and their translations
(:mod:`budget.objects`) and hands out immutable :class:`budget.ClusterView` snapshots.
"""

from kubeview.cache import KIND_SPECS, ClusterCache, KindSpec, load_api_client
from kubeview.rest import ApiCallError, raw_request, request_json

__all__ = ["KIND_SPECS", "ApiCallError", "ClusterCache", "KindSpec", "load_api_client", "raw_request", "request_json"]
