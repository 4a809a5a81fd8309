"""The runtime every halodiff feature stands on.

- `hooks`: stack-safe overrides / processor swaps / forward hooks, one weak registry of (target, feature).
- `clock`: which step of which generation each denoiser call is (`Step`), without host syncs.
- `adapters`: how features call a pipeline's denoisers, as the model specs (`halodiff.specs`) found them.
- `session`: the per-pipeline runtime features attach to (`attach`), and `new_generation` for custom loops.
"""
from .adapters import Denoiser, denoisers, predictor_of, unet_of, unwrap
from .clock import Clock, Step
from .hooks import Installation, features, install, lookup, uninstall
from .session import Runtime, Subscriber, attach, new_generation, runtime_of

__all__ = ["Clock", "Denoiser", "Installation", "Runtime", "Step", "Subscriber", "attach", "denoisers", "features",
           "install", "lookup", "new_generation", "predictor_of", "runtime_of", "uninstall", "unet_of", "unwrap"]
