"""kybernate-hookd: the node daemon that runs the CUDA checkpoint steps."""
