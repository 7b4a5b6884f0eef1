"""The typed hookd API the shim and the command-line tool import: client, model, manifest, errors, logs."""
