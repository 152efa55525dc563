"""nodewatch: the Kubernetes side of the node topic (cluster shape only).

Follows the cluster's Nodes (list + watch) and publishes each one's labels, taints and
allocatable capacity on the node topic; applies to Nodes the taints asked for on the node-taint
topic. Pure parts: :mod:`.mapping` (Kubernetes JSON -> Stoker facts, taint patches) and
:mod:`.book` (what to publish and patch next); :mod:`.app` is the I/O around them.
"""
