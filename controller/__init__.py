"""The InferenceModel controller: models become Deployments (+ Services), idle models scale to zero.

It also keeps each model's status (readiness, the scheduler's reason when pods are Pending, observed
peak memory and right-sizing advice), records deduplicated Events, and, with leader election, runs as
several replicas of which one acts. Pure parts (``translate``, ``status``, ``idle``, ``advice``,
``guard``, ``queue``) hold the logic; ``reconciler`` and ``manager`` do the I/O.
"""
