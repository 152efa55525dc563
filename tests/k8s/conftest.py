"""The k8s tier's fixtures: one real control plane (etcd + kube-apiserver) per session, the chart applied."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.k8s.cluster import Cluster, start_cluster

MANIFESTS = REPO_ROOT / "deploy" / "k8s"
NAMESPACE = "stoker"  # the release namespace of the committed manifests


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(tmp_path_factory.mktemp("kube"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def applied(cluster: Cluster) -> str:
    """Every committed manifest applied for real (server-side apply, no dry run); kubectl's output."""
    return cluster.kubectl("apply", "--server-side", "--field-manager=stoker-tests", "-f", str(MANIFESTS))


@pytest.fixture(scope="session")
def nodewatch_token(cluster: Cluster, applied: str) -> str:
    """A token of the chart's nodewatch service account (TokenRequest, as the kubelet would get one)."""
    return cluster.kubectl("-n", NAMESPACE, "create", "token", "stoker-nodewatch", "--duration=1h").strip()


@pytest.fixture(scope="session")
def nodewatch_kubeconfig(cluster: Cluster, nodewatch_token: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cluster.kubeconfig_for(nodewatch_token, tmp_path_factory.mktemp("sa") / "nodewatch.kubeconfig")
