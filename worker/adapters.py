"""LoRA adapters on the resident pipelines: an LRU of loaded adapters, applied by fusing them into the weights.

Loading (a cold adapter): diffusers' `load_lora_weights` reads the file, in PEFT/diffusers or kohya format, into
PEFT layers under a temporary adapter name; each layer's low-rank pair (down A, up B) and scaling are copied out
and the PEFT layers are removed again (`unload_lora_weights`), so the module tree is exactly the one that was
compiled. The pairs stay in a two-tier LRU: on the device (SDXL_ADAPTER_CACHE_MAX/_BYTES), and, once evicted
from it, in CPU memory (SDXL_ADAPTER_CPU_CACHE_MAX/_BYTES), from where they come back with one copy each and
no file read. An adapter given by URL (common/adapter_urls.py) is read from the object store, where the API put
it under its sha256, and its bytes are checked against that hash before they are used.

Applying (a request whose adapter set differs from the one applied): every layer touched by the old or the new
set gets its pristine weight back (a copy kept from the first time an adapter touched it) plus, for each new
adapter in request order, scale x scaling x B @ A, accumulated in one float32 scratch buffer (no allocation per
layer) and copied into the same tensor in place.
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

from common.adapter_urls import LoraFileError, adapter_key, check_lora_file
from common.adapters import Registry, RegistryError, registry_for
from common.contract.params import LoraRef
from common.storage import ObjectNotFound, ObjectStore, StorageUnavailable, build_store, get_with_retry
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


@dataclass
class LoadedAdapter:
    name: str
    sha256: str
    layers: list[LayerDelta]
    nbytes: int

    def to(self, device: torch.device | None) -> "LoadedAdapter":
        """The same pairs on `device` (None: each on its layer's own device). To the CPU from a GPU into pinned
        memory, so that the way back is a plain DMA copy."""
        def move(t: torch.Tensor, target: torch.device) -> torch.Tensor:
            if t.device == target:
                return t
            if target.type == "cpu":
                return t.to("cpu").pin_memory() if torch.cuda.is_available() else t.to("cpu")
            return t.to(target, non_blocking=True)

        layers = []
        for layer in self.layers:
            target = device or layer.module.weight.device
            layers.append(LayerDelta(layer.module, move(layer.down, target), move(layer.up, target), layer.scaling))
        return LoadedAdapter(self.name, self.sha256, layers, self.nbytes)


# (event, tier, seconds or None): load (tier `file`: read from its file; `cpu`: back from the CPU tier),
# swap (tier `device`), evict (tier `device`: down to the CPU tier, or `cpu`: dropped)
Event = Callable[[str, str, float | None], None]
Key = tuple[str, str]  # (name, sha256)


class AdapterCache:
    def __init__(self, pipes: dict[str, Any], settings: WorkerSettings, registry: Registry | None = None,
                 on_event: Event | None = None) -> None:
        """`pipes`: {"base": pipeline, "refiner": pipeline or None}; the refiner gets an adapter's refiner file."""
        self.pipes = pipes
        self.settings = settings
        self.registry = registry or registry_for(str(settings.adapters_dir) if settings.adapters_dir else None)
        self.on_event = on_event or (lambda _e, _t, _s: None)
        self.loaded: OrderedDict[Key, LoadedAdapter] = OrderedDict()  # the device tier, oldest first
        self.cpu: OrderedDict[Key, LoadedAdapter] = OrderedDict()  # the CPU tier: evicted from the device
        self.applied: tuple[tuple[str, str, float], ...] = ()
        self._applied_modules: list[Any] = []  # nn.Linear / nn.Conv2d layers with adapters fused now
        self._pristine: dict[int, tuple[Any, torch.Tensor]] = {}  # id(module) -> (module, weight)
        self.tier_counts: dict[tuple[str, str], int] = {}  # (event, tier) -> count
        self.pending: list[tuple[str, str, float | None]] = []  # events not yet counted in Redis (take_events)
        self._store: ObjectStore | None = None  # adapters by URL: their bytes, put there by the API
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

    @property
    def counts(self) -> dict[str, int]:
        """Events by kind (load, swap, evict), every tier together."""
        out = {"load": 0, "swap": 0, "evict": 0}
        for (kind, _tier), n in self.tier_counts.items():
            out[kind] += n
        return out

    @property
    def cpu_nbytes(self) -> int:
        return sum(a.nbytes for a in self.cpu.values())

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
                scratch = Scratch(max((m.weight.numel() for m in order if by_module[id(m)]), default=0))
                for m in order:
                    pristine = self._pristine_weight(m)
                    deltas = by_module[id(m)]
                    if not deltas:
                        m.weight.copy_(pristine)
                        continue
                    fuse(m, pristine, deltas, scratch)
                    applied.append(m)
        except BaseException:
            # half applied (out of memory, say): the next request restores every layer either set touched
            self.applied, self._applied_modules = (("<partial>", "", 0.0),), order
            raise
        self.applied, self._applied_modules = want, applied
        self._drop_unused_pristine()
        self._event("swap", "device", time.monotonic() - t0)

    # --- the LRU: device tier, then CPU tier ------------------------------------------------------
    def _get(self, ref: LoraRef, pinned: set[Key]) -> LoadedAdapter:
        key = (ref.name, ref.sha256)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        if key in self.cpu:  # back from CPU memory: one copy per pair, no file read
            t0 = time.monotonic()
            adapter = self.cpu.pop(key).to(None)
            if torch.cuda.is_available():
                torch.cuda.current_stream().synchronize()  # the seconds are the copy's, not its launch's
            self._event("load", "cpu", time.monotonic() - t0)
        else:
            adapter = self.load(ref)
        self.loaded[key] = adapter
        self._evict(pinned)
        return adapter

    def _evict(self, pinned: set[Key]) -> None:
        s = self.settings
        for key in list(self.loaded):
            if len(self.loaded) <= s.adapter_cache_max and self.nbytes <= s.adapter_cache_bytes:
                break
            if key in pinned:
                continue  # the request being applied needs it, even past the limits
            adapter = self.loaded.pop(key)
            self._event("evict", "device", None)
            if s.adapter_cpu_cache_max > 0 and adapter.nbytes <= s.adapter_cpu_cache_bytes:
                self.cpu[key] = adapter.to(torch.device("cpu"))
            log.info("adapter evicted", extra={"adapter": key[0], "sha256": key[1][:12], "tier": "device",
                                               "to_cpu": key in self.cpu, "cached": len(self.loaded),
                                               "cached_bytes": self.nbytes})
        for key in list(self.cpu):
            if len(self.cpu) <= s.adapter_cpu_cache_max and self.cpu_nbytes <= s.adapter_cpu_cache_bytes:
                break
            del self.cpu[key]
            self._event("evict", "cpu", None)
            log.info("adapter evicted", extra={"adapter": key[0], "sha256": key[1][:12], "tier": "cpu",
                                               "cached_cpu": len(self.cpu), "cached_cpu_bytes": self.cpu_nbytes})

    def load(self, ref: LoraRef) -> LoadedAdapter:
        """Read an adapter's files into low-rank pairs on the device (the weights themselves are left as they are)."""
        t0 = time.monotonic()
        parts: list[tuple[Any, str | dict[str, torch.Tensor]]]
        if ref.url is not None:
            parts = [(self.pipes["base"], self._url_weights(ref))]
        else:
            parts = self._registry_files(ref)
        layers: list[LayerDelta] = []
        seen: set[int] = set()
        for pipe, source in parts:
            for layer in self._read(pipe, source, ref.name):
                if id(layer.module) not in seen:  # text_encoder_2 is shared by base and refiner
                    seen.add(id(layer.module))
                    layers.append(layer)
        if not layers:
            raise AdapterUnavailable(f"adapter `{ref.name}` has no weights for any layer of this model")
        nbytes = sum(t.numel() * t.element_size() for layer in layers for t in (layer.down, layer.up))
        seconds = time.monotonic() - t0
        self._event("load", "file", seconds)
        log.info("adapter loaded", extra={"adapter": ref.name, "sha256": ref.sha256[:12], "layers": len(layers),
                                          "bytes": nbytes, "seconds": round(seconds, 4),
                                          **({"url": ref.url} if ref.url else {})})
        return LoadedAdapter(ref.name, ref.sha256, layers, nbytes)

    def _registry_files(self, ref: LoraRef) -> list[tuple[Any, str | dict[str, torch.Tensor]]]:
        try:
            found = self.registry.adapters().get(ref.name)
        except RegistryError as exc:
            raise AdapterUnavailable(f"the adapter registry cannot be read: {exc}") from None
        if found is None:
            raise AdapterUnavailable(f"adapter `{ref.name}` is no longer in the registry")
        if found.sha256 != ref.sha256:
            raise AdapterUnavailable(f"adapter `{ref.name}` changed since the request was accepted (its file's "
                                     f"sha256 is {found.sha256[:12]}..., the request's {ref.sha256[:12]}...)")
        parts: list[tuple[Any, str | dict[str, torch.Tensor]]] = [(self.pipes["base"], str(found.path))]
        if found.refiner_path is not None and self.pipes.get("refiner") is not None:
            parts.append((self.pipes["refiner"], str(found.refiner_path)))
        return parts

    def _url_weights(self, ref: LoraRef) -> dict[str, torch.Tensor]:
        """An adapter by URL: the bytes the API fetched and stored under their sha256, checked against it."""
        from safetensors.torch import load as load_safetensors

        if self._store is None:
            self._store = build_store(self.settings)
        key = adapter_key(self.settings.adapter_prefix, ref.sha256)
        try:
            data = get_with_retry(self._store, key, self.settings.storage_retry_seconds).data
        except ObjectNotFound:
            raise AdapterUnavailable(f"adapter `{ref.url}` is not in the object store (`{key}`): objects under "
                                     "SDXL_ADAPTER_PREFIX must outlive SDXL_ADAPTER_URL_TTL_SECONDS, during which "
                                     "the API takes the stored copy for the URL's") from None
        except StorageUnavailable as exc:
            raise AdapterUnavailable(f"adapter `{ref.url}` could not be read from the object store: {exc}") from None
        try:
            check_lora_file(data, ref.sha256)
        except LoraFileError as exc:
            raise AdapterUnavailable(f"adapter `{ref.url}` in the object store: {exc}") from None
        return load_safetensors(data)

    def _read(self, pipe: Any, source: str | dict[str, torch.Tensor], name: str) -> list[LayerDelta]:
        """`source`: a file path, or a state dict (copied: diffusers pops keys from the dict it is given)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers: list[LayerDelta] = []
        with _uncompiled(pipe):
            try:
                pipe.load_lora_weights(source if isinstance(source, str) else dict(source),
                                       adapter_name=LOADING_NAME)
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
        """Keep pristine copies only of layers an applied adapter or one on the device tier touches: memory
        follows that tier (a layer not fused now is pristine, so a later first touch copies it again)."""
        keep = {id(m) for m in self._applied_modules}
        keep |= {id(layer.module) for a in self.loaded.values() for layer in a.layers}
        for key in [k for k in self._pristine if k not in keep]:
            del self._pristine[key]

    def take_events(self) -> list[tuple[str, str, float | None]]:
        events, self.pending = self.pending, []
        return events

    def _event(self, kind: str, tier: str, seconds: float | None) -> None:
        self.tier_counts[(kind, tier)] = self.tier_counts.get((kind, tier), 0) + 1
        self.pending.append((kind, tier, seconds))
        del self.pending[:-1000]  # bounded if nobody takes them (benchmarks)
        try:
            self.on_event(kind, tier, seconds)
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


def fuse(module: Any, pristine: torch.Tensor, deltas: list[tuple[LayerDelta, float]], scratch: "Scratch") -> None:
    """module.weight = pristine + sum(scale x scaling x up @ down), in float32, in place. In one reused buffer: a
    full-size float32 temporary per layer would churn the allocator on every swap (bench/adapters.py `fuse`)."""
    w = scratch.take(pristine)
    for layer, scale in deltas:
        w.addmm_(layer.up.flatten(1).float(), layer.down.flatten(1).float(), alpha=scale * layer.scaling)
    module.weight.copy_(w.view(module.weight.shape))


class Scratch:
    """One float32 buffer reused for every layer of a swap, grown to the largest layer's size."""

    def __init__(self, numel: int) -> None:
        self.numel = numel  # the largest layer's: one allocation per swap on each device
        self.buf: torch.Tensor | None = None

    def take(self, pristine: torch.Tensor) -> torch.Tensor:
        """A float32 (out, in) view holding `pristine`."""
        n = pristine.numel()
        if self.buf is None or self.buf.numel() < n or self.buf.device != pristine.device:
            self.buf = torch.empty(max(n, self.numel), dtype=torch.float32, device=pristine.device)
        w = self.buf[:n].view(pristine.shape[0], -1)
        w.copy_(pristine.view(pristine.shape[0], -1))
        return w
