"""kybernate-hookd, the node daemon: gRPC service, GPU manager, settings, metrics, lifecycle."""
