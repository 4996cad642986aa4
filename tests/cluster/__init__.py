"""Cluster test tier: tests against a real Kubernetes control plane built from source (see harness.py)."""
