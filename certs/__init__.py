"""TLS for the webhook and the extender: certificates, their storage in a Secret, and hot reload.

kube-apiserver only calls admission webhooks over HTTPS and checks the serving certificate against the
`caBundle` of the webhook configuration; kube-scheduler does the same for an extender when given a CA.
This package makes those certificates (`generate`), keeps them in a Secret and the caBundle in step on
clusters without cert-manager (`bootstrap`), and lets a running server pick up a renewed pair without a
restart (`reload`). Submodules are imported on demand so a server that only reloads does not load the
Kubernetes client.
"""
