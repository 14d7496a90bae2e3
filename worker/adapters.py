"""LoRA adapters on the resident pipelines: an LRU of loaded adapters, applied by fusing them into the weights.

Loading (a cold adapter): diffusers' `load_lora_weights` reads the file, in PEFT/diffusers or kohya format, into
PEFT layers under a temporary adapter name; each layer's low-rank pair (down A, up B) and scaling are copied out
and the PEFT layers are removed again (`unload_lora_weights`), so the module tree is exactly the one that was
compiled. The pairs stay on the device, in the LRU (count and bytes limits: SDXL_ADAPTER_CACHE_MAX/_BYTES).

Applying (a request whose adapter set differs from the one applied): every layer touched by the old or the new
set gets its pristine weight back (a copy kept from the first time an adapter touched it) plus, for each new
adapter in request order, scale x scaling x B @ A, computed in float32 and copied into the same tensor in place.
The weights of a layer are thus a function of (pristine weight, adapters, scales) alone: the same request gives
the same bytes whatever ran before, and a request without adapters runs on the pristine weights. In place, the
parameters keep their identity and storage, so a compiled UNet (and a recorded CUDA graph) stays valid: swapping
adapters never recompiles (bench/adapters.py counts it). A request whose adapters are already applied pays
nothing; the cost of a swap is one small matmul per touched layer (bench/adapters.py: as a ratio to one step).
"""

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from common.adapters import Registry, RegistryError, registry_for
from common.contract.params import LoraRef
from worker.settings import WorkerSettings

log = logging.getLogger("worker.adapters")
LOADING_NAME = "sdxl_loading"  # the PEFT adapter name an adapter has while its weights are copied out
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class AdapterUnavailable(Exception):
    """An adapter cannot be loaded: gone from the registry, changed since submit, or in an unsupported form."""


@dataclass
class LayerDelta:
    """One layer's LoRA: weight += scale * scaling * up @ down (reshaped to the weight's shape)."""

    module: Any  # the base layer (nn.Linear or nn.Conv2d) whose weight it changes
    down: torch.Tensor  # (r, in) or (r, in, k, k)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scaling: float

    def delta(self) -> torch.Tensor:
        weight = self.module.weight
        return (self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(weight.shape) * self.scaling


@dataclass
class LoadedAdapter:
    name: str
    sha256: str
    layers: list[LayerDelta]
    nbytes: int


Event = Callable[[str, float | None], None]  # (load | swap | evict, seconds or None)


class AdapterCache:
    def __init__(self, pipes: dict[str, Any], settings: WorkerSettings, registry: Registry | None = None,
                 on_event: Event | None = None) -> None:
        """`pipes`: {"base": pipeline, "refiner": pipeline or None}; the refiner gets an adapter's refiner file."""
        self.pipes = pipes
        self.settings = settings
        self.registry = registry or registry_for(str(settings.adapters_dir) if settings.adapters_dir else None)
        self.on_event = on_event or (lambda _e, _s: None)
        self.loaded: OrderedDict[tuple[str, str], LoadedAdapter] = OrderedDict()  # LRU, oldest first
        self.applied: tuple[tuple[str, str, float], ...] = ()
        self._applied_modules: list[Any] = []  # nn.Linear / nn.Conv2d layers with adapters fused now
        self._pristine: dict[int, tuple[Any, torch.Tensor]] = {}  # id(module) -> (module, weight)
        self.counts = {"load": 0, "swap": 0, "evict": 0}
        self.pending: list[tuple[str, float | None]] = []  # events not yet counted in Redis (take_events)
        # PEFT freezes the parameters of a model it loads into; frozen from the start, the first load changes
        # nothing a compiled graph's guards check (requires_grad is one): no recompilation
        for pipe in pipes.values():
            for component in COMPONENTS:
                model = getattr(pipe, component, None) if pipe is not None else None
                if model is not None:
                    model.requires_grad_(False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.loaded.values())

    # --- per request ------------------------------------------------------------------------------
    def apply(self, loras: Sequence[LoraRef]) -> None:
        """Make the weights those of the pristine model with `loras` fused, in order. No-op when they are."""
        want = tuple((r.name, r.sha256, r.scale) for r in loras)
        if want == self.applied:
            for r in loras:
                self.loaded.move_to_end((r.name, r.sha256))
            return
        adapters = [self._get(r, pinned={(x.name, x.sha256) for x in loras}) for r in loras]
        t0 = time.monotonic()
        by_module: dict[int, list[tuple[LayerDelta, float]]] = {}
        order: list[Any] = []
        for m in self._applied_modules:
            if id(m) not in by_module:
                by_module[id(m)] = []
                order.append(m)
        for adapter, ref in zip(adapters, loras, strict=True):
            for layer in adapter.layers:
                if id(layer.module) not in by_module:
                    by_module[id(layer.module)] = []
                    order.append(layer.module)
                by_module[id(layer.module)].append((layer, ref.scale))
        applied: list[Any] = []
        try:
            with torch.no_grad():
                for m in order:
                    pristine = self._pristine_weight(m)
                    deltas = by_module[id(m)]
                    if not deltas:
                        m.weight.copy_(pristine)
                        continue
                    w = pristine.to(torch.float32, copy=True)  # .float() of a float32 tensor is that tensor
                    for layer, scale in deltas:
                        w.add_(layer.delta(), alpha=scale)
                    m.weight.copy_(w)
                    applied.append(m)
        except BaseException:
            # half applied (out of memory, say): the next request restores every layer either set touched
            self.applied, self._applied_modules = (("<partial>", "", 0.0),), order
            raise
        self.applied, self._applied_modules = want, applied
        self._drop_unused_pristine()
        self._event("swap", time.monotonic() - t0)

    # --- the LRU ----------------------------------------------------------------------------------
    def _get(self, ref: LoraRef, pinned: set[tuple[str, str]]) -> LoadedAdapter:
        key = (ref.name, ref.sha256)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        adapter = self.load(ref)
        self.loaded[key] = adapter
        self._evict(pinned)
        return adapter

    def _evict(self, pinned: set[tuple[str, str]]) -> None:
        for key in list(self.loaded):
            if len(self.loaded) <= self.settings.adapter_cache_max and self.nbytes <= self.settings.adapter_cache_bytes:
                return
            if key in pinned:
                continue  # the request being applied needs it, even past the limits
            del self.loaded[key]
            self._event("evict", None)
            log.info("adapter evicted", extra={"adapter": key[0], "sha256": key[1][:12],
                                               "cached": len(self.loaded), "cached_bytes": self.nbytes})

    def load(self, ref: LoraRef) -> LoadedAdapter:
        """Read an adapter's files into low-rank pairs on the device (the weights themselves are left as they are)."""
        t0 = time.monotonic()
        try:
            found = self.registry.adapters().get(ref.name)
        except RegistryError as exc:
            raise AdapterUnavailable(f"the adapter registry cannot be read: {exc}") from None
        if found is None:
            raise AdapterUnavailable(f"adapter `{ref.name}` is no longer in the registry")
        if found.sha256 != ref.sha256:
            raise AdapterUnavailable(f"adapter `{ref.name}` changed since the request was accepted (its file's "
                                     f"sha256 is {found.sha256[:12]}..., the request's {ref.sha256[:12]}...)")
        parts = [(self.pipes["base"], found.path)]
        if found.refiner_path is not None and self.pipes.get("refiner") is not None:
            parts.append((self.pipes["refiner"], found.refiner_path))
        layers: list[LayerDelta] = []
        seen: set[int] = set()
        for pipe, path in parts:
            for layer in self._read(pipe, str(path), ref.name):
                if id(layer.module) not in seen:  # text_encoder_2 is shared by base and refiner
                    seen.add(id(layer.module))
                    layers.append(layer)
        if not layers:
            raise AdapterUnavailable(f"adapter `{ref.name}` has no weights for any layer of this model")
        nbytes = sum(t.numel() * t.element_size() for layer in layers for t in (layer.down, layer.up))
        seconds = time.monotonic() - t0
        self._event("load", seconds)
        log.info("adapter loaded", extra={"adapter": ref.name, "sha256": ref.sha256[:12], "layers": len(layers),
                                          "bytes": nbytes, "seconds": round(seconds, 4)})
        return LoadedAdapter(ref.name, ref.sha256, layers, nbytes)

    def _read(self, pipe: Any, path: str, name: str) -> list[LayerDelta]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers: list[LayerDelta] = []
        with _uncompiled(pipe):
            try:
                pipe.load_lora_weights(path, adapter_name=LOADING_NAME)
            except Exception as exc:
                pipe.unload_lora_weights()
                raise AdapterUnavailable(f"adapter `{name}` could not be loaded: {type(exc).__name__}: "
                                         f"{str(exc)[:300]}") from exc
            try:
                for component in COMPONENTS:
                    model = getattr(pipe, component, None)
                    if model is None:
                        continue
                    for module_name, m in model.named_modules():
                        if not isinstance(m, BaseTunerLayer) or LOADING_NAME not in getattr(m, "lora_A", {}):
                            continue
                        layers.append(self._layer(m, f"{component}.{module_name}", name))
            finally:
                pipe.unload_lora_weights()  # back to the very modules that were compiled
        return layers

    @staticmethod
    def _layer(m: Any, where: str, name: str) -> LayerDelta:
        base = m.get_base_layer()
        down, up = m.lora_A[LOADING_NAME], m.lora_B[LOADING_NAME]
        if getattr(m, "use_dora", {}).get(LOADING_NAME) or getattr(up, "bias", None) is not None:
            raise AdapterUnavailable(f"adapter `{name}` uses DoRA or LoRA biases at {where}: not supported")
        if not isinstance(base, torch.nn.Linear | torch.nn.Conv2d) or up.weight.dim() == 4 \
                and tuple(up.weight.shape[2:]) != (1, 1):
            raise AdapterUnavailable(f"adapter `{name}` has a {type(base).__name__} LoRA at {where}: not supported")
        return LayerDelta(base, down.weight.detach().clone(), up.weight.detach().clone(),
                          float(m.scaling[LOADING_NAME]))

    # --- pristine weights -------------------------------------------------------------------------
    def _pristine_weight(self, m: Any) -> torch.Tensor:
        if id(m) not in self._pristine:  # first touch: the weight is still the model's own
            self._pristine[id(m)] = (m, m.weight.detach().clone())
        return self._pristine[id(m)][1]

    def _drop_unused_pristine(self) -> None:
        """Keep pristine copies only of layers an applied or cached adapter touches: memory follows the cache."""
        keep = {id(m) for m in self._applied_modules}
        keep |= {id(layer.module) for a in self.loaded.values() for layer in a.layers}
        for key in [k for k in self._pristine if k not in keep]:
            del self._pristine[key]

    def take_events(self) -> list[tuple[str, float | None]]:
        events, self.pending = self.pending, []
        return events

    def _event(self, kind: str, seconds: float | None) -> None:
        self.counts[kind] += 1
        self.pending.append((kind, seconds))
        del self.pending[:-1000]  # bounded if nobody takes them (benchmarks)
        try:
            self.on_event(kind, seconds)
        except Exception:  # a metric never fails a job
            log.warning("adapter metric not recorded", exc_info=True)


@contextmanager
def _uncompiled(pipe: Any) -> Iterator[None]:
    """diffusers loads LoRA layers into the UNet itself, not into torch.compile's wrapper of it."""
    compiled = pipe.unet
    inner = getattr(compiled, "_orig_mod", None)
    if inner is None:
        yield
        return
    pipe.unet = inner
    try:
        yield
    finally:
        pipe.unet = compiled
