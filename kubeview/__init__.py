"""Kubernetes, for every part: the one API layer (`kubeview.api`: resources that know their paths, JSON
in and out, one `ApiError` carrying the HTTP status) and the live source of the budget view
(`kubeview.cache`: list+watch of Nodes and their DRA ResourceSlices, Pods, Deployments and
InferenceModels).

This is the Kubernetes adapter the architecture places beside `budget/`: it imports the kubernetes
client so that `budget/` never has to. The cache keeps the raw objects and their translations
(:mod:`budget.objects`) and hands out immutable :class:`budget.ClusterView` snapshots.
"""

from kubeview.api import ApiError, Kube, Resource, load_api_client
from kubeview.cache import ClusterCache

__all__ = ["ApiError", "ClusterCache", "Kube", "Resource", "load_api_client"]
