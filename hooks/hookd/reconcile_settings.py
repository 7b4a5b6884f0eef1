"""The reconciler's settings (a leaf module: settings.py and reconcile.py both import it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReconcileSettings:
    # The directory the shims write intent files to ([kybernate] intent_dir in runtime.toml).
    intent_dir: str = "/run/kybernate/intent"
    # Seconds between passes; 0 runs the pass at start only.
    period_s: float = 10.0
