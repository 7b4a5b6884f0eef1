"""Test harness for Kybernate: the provisioned stack, private containerd instances, test images, a CRI client.

Modules are imported by name (`from harness import containerd, images`); nothing is re-exported here so
that importing the package stays free of grpc and subprocess side effects.
"""
