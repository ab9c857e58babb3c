"""A real one-node Kubernetes cluster in a test-world site, built from Go modules (see docs/kubernetes-cluster.md).

`python -m tests.world.k8s up SITE` / `down SITE` / `status SITE` / `build`; in Python `Cluster(site).up()`.
"""
