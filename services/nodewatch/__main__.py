"""``python -m services.nodewatch``: follow the cluster's Nodes (in a pod, or with ``KUBECONFIG``)."""

from services.nodewatch.app import main

if __name__ == "__main__":
    main()
