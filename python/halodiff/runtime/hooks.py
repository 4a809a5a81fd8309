"""Stack-safe installs on live objects, removable by feature in any order, with rollback.

Every halodiff feature (patch parallelism, DeepCache, streams, the denoising clock) changes a pipeline only
through an `Installation`:

- `override(obj, attr, make)`: an instance attribute (a module's `forward`, a scheduler's `set_timesteps`)
  becomes `make_n(... make_1(original))`. Features stack on one attribute through a per-attribute chain with a
  stable dispatcher: removing any layer rebuilds the chain; removing the last one restores the attribute exactly
  (deleted again when it was a class attribute). If another library wrapped our dispatcher in the meantime, the
  dispatcher stays in their chain and simply calls through.
- `processor(attn, make)`: diffusers attention-processor swaps, stacked the same way.
- `pre_hook` / `post_hook`: torch forward hooks (they stack natively), removed by handle.

One weak registry maps (target, feature) -> Installation; `install` rolls back a failed install.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from ..errors import PatchError

_MISSING = object()
Factory = Callable[[Any], Any]  # inner callable/processor -> wrapped callable/processor


class _Chain:
    """The override stack of one attribute of one object."""

    def __init__(self, obj: Any, attr: str):
        self.obj = weakref.ref(obj)
        self.attr = attr
        self.saved = obj.__dict__.get(attr, _MISSING)  # what to restore
        self.base = getattr(obj, attr)  # what callers got before us
        self.layers: list[tuple[object, Factory]] = []
        self.fn = self.base
        chain = self

        def dispatch(*args, **kwargs):
            return chain.fn(*args, **kwargs)

        dispatch.__wrapped__ = self.base  # type: ignore[attr-defined]
        self.dispatch = dispatch
        setattr(obj, attr, dispatch)

    def rebuild(self) -> None:
        fn = self.base
        for _, make in self.layers:
            fn = make(fn)
        self.fn = fn

    def release(self) -> None:
        """No layer left: restore the attribute unless someone else wrapped the dispatcher since."""
        self.fn = self.base
        obj = self.obj()
        if obj is not None and obj.__dict__.get(self.attr) is self.dispatch:
            if self.saved is _MISSING:
                del obj.__dict__[self.attr]
            else:
                setattr(obj, self.attr, self.saved)


class _ProcessorChain:
    """Stacked `Attention.set_processor` swaps of one attention module."""

    def __init__(self, attn: Any):
        self.attn = weakref.ref(attn)
        self.base = attn.processor
        self.layers: list[tuple[object, Factory]] = []
        self.top = self.base

    def rebuild(self) -> None:
        attn = self.attn()
        current_is_ours = attn is not None and attn.processor is self.top
        proc = self.base
        for _, make in self.layers:
            proc = make(proc)
        self.top = proc
        if current_is_ours:  # a processor someone set after us stays
            attn.set_processor(proc)

    def release(self) -> None:
        self.layers.clear()
        self.rebuild()


# obj -> {attr: weakref to its _Chain}. Weak both ways: the chain is owned by the dispatcher stored on the object
# (and by the installations using it), so dropping a pipeline without undoing its features frees it.
_CHAINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROCESSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> weakref to _ProcessorChain


class Installation:
    """What one feature installed on one target; `remove()` undoes all of it, newest first."""

    def __init__(self, feature: str):
        self.feature = feature
        self._undo: list[Callable[[], None]] = []
        self.removed = False

    def override(self, obj: Any, attr: str, make: Factory) -> None:
        """Wrap `obj.attr` (usually a bound method) with `make(inner) -> callable`."""
        chains = _CHAINS.setdefault(obj, {})
        chain = chains[attr]() if attr in chains else None
        if chain is None:
            chain = _Chain(obj, attr)
            chains[attr] = weakref.ref(chain)
        token = object()
        chain.layers.append((token, make))
        chain.rebuild()
        # Weak: the chain (through its base, a bound method) holds `obj`, and this undo lives in the registry.
        obj_ref, chain_ref = weakref.ref(obj), weakref.ref(chain)

        def undo() -> None:
            chain, obj = chain_ref(), obj_ref()
            if chain is None or obj is None:
                return
            chain.layers[:] = [(t, m) for t, m in chain.layers if t is not token]
            if chain.layers:
                chain.rebuild()
                return
            chain.release()
            owner = _CHAINS.get(obj)
            if owner is not None and attr in owner and owner[attr]() is chain:
                del owner[attr]
                if not owner:
                    del _CHAINS[obj]

        self._undo.append(undo)

    def processor(self, attn: Any, make: Factory) -> None:
        """Swap a diffusers attention processor for `make(inner_processor)`."""
        ref = _PROCESSORS.get(attn)
        chain = ref() if ref is not None else None
        if chain is None:
            chain = _ProcessorChain(attn)
            _PROCESSORS[attn] = weakref.ref(chain)
        token = object()
        chain.layers.append((token, make))
        chain.rebuild()

        def undo() -> None:
            chain.layers[:] = [(t, m) for t, m in chain.layers if t is not token]
            chain.rebuild()
            ref = _PROCESSORS.get(attn)
            if not chain.layers and ref is not None and ref() is chain:
                del _PROCESSORS[attn]

        self._undo.append(undo)

    def pre_hook(self, module: Any, fn: Callable, *, prepend: bool = False) -> None:
        self._undo.append(module.register_forward_pre_hook(fn, with_kwargs=True, prepend=prepend).remove)

    def post_hook(self, module: Any, fn: Callable, *, prepend: bool = False) -> None:
        self._undo.append(module.register_forward_hook(fn, with_kwargs=True, prepend=prepend).remove)

    def on_remove(self, fn: Callable[[], None]) -> None:
        """Run `fn` when this installation is removed (in reverse order with the rest)."""
        self._undo.append(fn)

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        errors = []
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:  # keep undoing the rest; report the first failure
                errors.append(exc)
        self._undo.clear()
        if errors:
            raise errors[0]


# ------------------------------------------------------------------------------------------ registry
_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # target -> {feature: (Installation, state)}


def lookup(target: Any, feature: str) -> tuple[Installation, Any] | None:
    """The (installation, state) of `feature` on `target` (a pipeline or one of its denoisers), if any."""
    try:
        return _REGISTRY.get(target, {}).get(feature)
    except TypeError:  # not weak-referenceable / unhashable: nothing can be installed on it
        return None


def features(target: Any) -> list[str]:
    """The features installed on `target`, in install order."""
    try:
        return list(_REGISTRY.get(target, {}))
    except TypeError:
        return []


def install(feature: str, targets: list[Any], build: Callable[[Installation], Any]) -> Any:
    """Run `build(installation)` and register its result under (target, feature) for every target.

    If `build` raises, everything it installed is undone before the error propagates. Callers check for
    a double install first (their messages differ), so this only asserts it."""
    inst = Installation(feature)
    try:
        state = build(inst)
    except BaseException:
        inst.remove()
        raise
    for target in targets:
        if lookup(target, feature) is not None:  # pragma: no cover - callers check first
            inst.remove()
            raise PatchError(f"halodiff: {feature} is already installed on {type(target).__name__}")
    for target in targets:
        _REGISTRY.setdefault(target, {})[feature] = (inst, state)
    return state


def uninstall(target: Any, feature: str) -> Any:
    """Remove `feature` from `target` (and every alias it was registered under); returns its state."""
    entry = lookup(target, feature)
    if entry is None:
        raise PatchError(f"halodiff: {feature} is not installed on this {type(target).__name__}")
    inst, state = entry
    for owner in list(_REGISTRY.keys()):
        feats = _REGISTRY.get(owner)
        if feats is not None and feats.get(feature, (None,))[0] is inst:
            del feats[feature]
            if not feats:
                del _REGISTRY[owner]
    inst.remove()
    return state
