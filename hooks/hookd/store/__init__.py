"""kybernate.hooks.hookd.store: hookd's checkpoint store: checkpoints into it, its index, its uploads."""
