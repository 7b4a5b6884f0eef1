"""The `kybernate` command-line tool and its client of containerd's own API."""
