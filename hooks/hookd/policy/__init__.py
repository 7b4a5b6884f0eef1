"""kybernate.hooks.hookd.policy: scale-to-zero and multiplexing on a node (docs/standby.md).

settings.py    node defaults and the per-workload policy from kybernate.io/standby* annotations
workloads.py   which workloads hookd manages: the shim's intent files plus each bundle's annotations
signals.py     idle detection: GPU utilisation (NVML), the cgroup's CPU time, the pod's TCP/UDP counters
sockwatch.py   pending connections on a parked pod's listening sockets (sock_diag over netlink, in its netns)
arbiter.py     which idle workloads to park so that a wake fits in a GPU's VRAM (pure)
record.py      what hookd remembers of a park across its own restarts (a small file per workload)
executor.py    park and wake through containerd (Tasks.Pause/Resume), serialised per GPU, bounded per node
controller.py  the loop: discover, sample, park the idle, wake on connect, answer the Standby service
service.py     the Standby gRPC service (proto/kybernate/api/standby.proto)
"""
