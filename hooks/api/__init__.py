"""The typed hookd API the shim and the command-line tool import: client, model, manifest, errors, logs.

Standard library only at import time (grpc loads on a client's first call): the shim imports this part.
"""

# Where kybernate-hookd serves its API unless configured otherwise (hookd's --socket, the shim's
# `hookd_socket` runtime option).
DEFAULT_SOCKET = "/run/kybernate/hookd.sock"
