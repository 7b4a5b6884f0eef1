"""kybernate.hooks.containerd: Kybernate's client of containerd's gRPC API, for hookd, the CLI and the test harness."""
