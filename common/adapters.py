"""The adapter registry: LoRA files and few-step presets the operator declares, read the same way by every process.

A registry is one folder (`SDXL_ADAPTERS_DIR`): every `*.safetensors` in it is an adapter named after its file's
stem, and an optional `adapters.json` manifest names, describes and bounds them and declares presets:

    {"adapters": {"style": {"file": "style.safetensors", "base": "sdxl", "scale_min": 0, "scale_max": 1.5,
                            "description": "...", "refiner_file": "style-refiner.safetensors"}},
     "presets":  {"lcm": {"adapter": "lcm-lora", "adapter_scale": 1.0, "scheduler": "lcm",
                          "scheduler_config": {}, "steps": 4, "steps_min": 2, "steps_max": 8,
                          "guidance_scale": 1.0, "description": "..."}}}

An entry may name a hub file instead (`"hub_id": "org/name"`, optional `weight_name` and `revision`), resolved
with huggingface_hub's `hf_hub_download` into the local hub cache (from it alone under HF_HUB_OFFLINE=1).
The API lists and validates with it (no torch: safetensors headers are parsed here); workers load the files it
names. The base model an adapter is for comes from the manifest, else from kohya metadata in the file's header
(`ss_base_model_version`, `modelspec.architecture`), else the deployment's own is assumed. File hashes are
computed once per (path, size, mtime); the registry re-reads the folder when it or the manifest changes.
"""

import hashlib
import json
import re
import struct
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.contract.params import SCHEDULERS

MANIFEST = "adapters.json"
HUB_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_SCALE_RANGE = (-2.0, 2.0)  # an adapter's scale range unless its manifest entry says otherwise
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
# scheduler_config keys a preset may set (from_config would silently ignore a misspelt one)
SCHEDULER_CONFIG_KEYS = {"timestep_spacing", "steps_offset", "use_karras_sigmas", "prediction_type",
                         "original_inference_steps", "rescale_betas_zero_snr", "final_sigmas_type",
                         "timestep_type", "interpolation_type", "sigma_min", "sigma_max"}


class RegistryError(ValueError):
    """The registry folder or manifest is invalid; the message names the entry and the key."""


def base_family(text: str | None) -> str | None:
    """A model id or kohya base-model string -> a family (`sdxl`, `sd1`, `sd2`, `sd3`, `flux`), None if unknown."""
    if not text:
        return None
    t = text.lower()
    for family, marks in (("flux", ("flux",)), ("sd3", ("sd3", "stable-diffusion-3", "sd_3")),
                          ("sdxl", ("sdxl", "xl")), ("sd2", ("sd_v2", "sd2", "v2-", "stable-diffusion-2")),
                          ("sd1", ("sd_v1", "sd1", "v1-", "stable-diffusion-v1", "stable-diffusion-1"))):
        if any(m in t for m in marks):
            return family
    return None


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), without reading tensors."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise RegistryError(f"{path.name} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise RegistryError(f"{path.name} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise RegistryError(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise RegistryError(f"{path.name} is not a safetensors file (its header is not an object)")
    return header


def metadata_base(header: dict[str, Any]) -> str | None:
    """The base model kohya-style metadata names, if any."""
    meta = header.get("__metadata__") or {}
    for key in ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name"):
        value = meta.get(key)
        if isinstance(value, str) and base_family(value):
            return value
    return None


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    sha256: str
    bytes: int
    base: str  # a family (`sdxl`, ...), as declared or read from the file
    base_source: str  # "manifest", "metadata" or "assumed"
    scale_min: float
    scale_max: float
    description: str = ""
    refiner_path: Path | None = None  # LoRA weights for the refiner's UNet (a different architecture)
    refiner_sha256: str | None = None

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "adapter", "description": self.description, "base": self.base,
                "base_source": self.base_source, "sha256": self.sha256, "bytes": self.bytes,
                "scale_min": self.scale_min, "scale_max": self.scale_max, "refiner": self.refiner_path is not None}


@dataclass(frozen=True)
class Preset:
    name: str
    adapter: str | None  # an adapter of the same registry, applied first at `adapter_scale`
    adapter_scale: float
    scheduler: str  # one of common.contract.params.SCHEDULERS
    scheduler_config: dict[str, Any]
    steps: int
    steps_min: int
    steps_max: int
    guidance_scale: float
    description: str = ""

    def public(self, adapters: dict[str, Adapter]) -> dict[str, Any]:
        a = adapters.get(self.adapter or "")
        return {"name": self.name, "kind": "preset", "description": self.description,
                "base": a.base if a else None, "adapter": self.adapter, "adapter_scale": self.adapter_scale,
                "sha256": a.sha256 if a else None, "bytes": a.bytes if a else None,
                "scheduler": self.scheduler, "scheduler_config": self.scheduler_config, "steps": self.steps,
                "steps_min": self.steps_min, "steps_max": self.steps_max, "guidance_scale": self.guidance_scale}


@dataclass
class _Snapshot:
    stamp: tuple[Any, ...] = ()
    adapters: dict[str, Adapter] = field(default_factory=dict)
    presets: dict[str, Preset] = field(default_factory=dict)


class Registry:
    """One registry folder. `None` or a missing folder: an empty registry (no adapters, no presets)."""

    def __init__(self, root: Path | None, deployment_base: str = "sdxl") -> None:
        self.root = root
        self.deployment_base = deployment_base
        self._lock = threading.Lock()
        self._snap = _Snapshot()
        self._hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256

    # --- reading -----------------------------------------------------------------------------------
    def adapters(self) -> dict[str, Adapter]:
        return self._current().adapters

    def presets(self) -> dict[str, Preset]:
        return self._current().presets

    def listing(self) -> list[dict[str, Any]]:
        snap = self._current()
        return [a.public() for a in snap.adapters.values()] + [p.public(snap.adapters) for p in snap.presets.values()]

    def by_sha256(self, sha256: str) -> Adapter | None:
        return next((a for a in self.adapters().values() if a.sha256 == sha256), None)

    def _stamp(self) -> tuple[Any, ...]:
        if self.root is None or not self.root.is_dir():
            return ()
        parts: list[Any] = [self.root.stat().st_mtime_ns]
        for p in sorted(self.root.iterdir()):
            if p.suffix == ".safetensors" or p.name == MANIFEST:
                st = p.stat()
                parts.append((p.name, st.st_size, st.st_mtime_ns))
        return tuple(parts)

    def _current(self) -> _Snapshot:
        with self._lock:
            stamp = self._stamp()
            if stamp != self._snap.stamp or not stamp and self._snap.adapters:
                self._snap = self._read(stamp)
            return self._snap

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._hashes[key] = h.hexdigest()
        return self._hashes[key]

    def _read(self, stamp: tuple[Any, ...]) -> _Snapshot:
        if not stamp:
            return _Snapshot()
        assert self.root is not None
        manifest_path = self.root / MANIFEST
        manifest: dict[str, Any] = {}
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
            except ValueError as exc:
                raise RegistryError(f"{manifest_path} is not valid JSON: {exc}") from None
            if not isinstance(manifest, dict) or set(manifest) - {"adapters", "presets"}:
                raise RegistryError(f"{manifest_path}: an object with `adapters` and `presets` only")
        entries: dict[str, Any] = dict(manifest.get("adapters") or {})
        declared = {str(e.get("file", f"{n}.safetensors")) for n, e in entries.items() if isinstance(e, dict)}
        declared |= {str(e["refiner_file"]) for e in entries.values() if isinstance(e, dict) and e.get("refiner_file")}
        for p in sorted(self.root.glob("*.safetensors")):  # undeclared files: adapters named after their stem
            if p.name not in declared and p.stem not in entries:
                entries[p.stem] = {}
        adapters = {name: self._adapter(name, entry) for name, entry in entries.items()}
        presets = {name: self._preset(name, entry, adapters)
                   for name, entry in (manifest.get("presets") or {}).items()}
        return _Snapshot(stamp, adapters, presets)

    def _adapter(self, name: str, entry: Any) -> Adapter:
        where = f"{MANIFEST}: adapter `{name}`"
        if not NAME_RE.match(name):
            raise RegistryError(f"{where}: names are 1-64 letters, digits, `.`, `_` or `-`")
        if not isinstance(entry, dict):
            raise RegistryError(f"{where} must be an object")
        unknown = set(entry) - {"file", "base", "scale_min", "scale_max", "description", "refiner_file", "hub_id",
                                "weight_name", "revision"}
        if unknown:
            raise RegistryError(f"{where}: unknown keys {sorted(unknown)}")
        assert self.root is not None
        if entry.get("hub_id") is not None:
            path = self._hub_file(where, entry)
        elif {"weight_name", "revision"} & set(entry):
            raise RegistryError(f"{where}: `weight_name` and `revision` go with `hub_id`")
        else:
            path = self._file(where, entry.get("file", f"{name}.safetensors"))
        header = safetensors_header(path)
        if entry.get("base"):
            base, source = base_family(str(entry["base"])) or str(entry["base"]), "manifest"
        elif (found := metadata_base(header)) is not None:
            base, source = base_family(found) or found, "metadata"
        else:
            base, source = self.deployment_base, "assumed"
        lo = float(entry.get("scale_min", DEFAULT_SCALE_RANGE[0]))
        hi = float(entry.get("scale_max", DEFAULT_SCALE_RANGE[1]))
        if lo > hi:
            raise RegistryError(f"{where}: scale_min {lo} is above scale_max {hi}")
        refiner = self._file(where, entry["refiner_file"]) if entry.get("refiner_file") else None
        return Adapter(name=name, path=path, sha256=self.sha256(path), bytes=path.stat().st_size, base=base,
                       base_source=source, scale_min=lo, scale_max=hi, description=str(entry.get("description", "")),
                       refiner_path=refiner, refiner_sha256=self.sha256(refiner) if refiner else None)

    def _file(self, where: str, file: Any) -> Path:
        assert self.root is not None
        if not isinstance(file, str) or "/" in file or "\\" in file or not file.endswith(".safetensors"):
            raise RegistryError(f"{where}: `file` must be a `.safetensors` file name in the registry folder, "
                                f"not {file!r}")
        path = self.root / file
        if not path.is_file():
            raise RegistryError(f"{where}: {path} does not exist")
        return path

    @staticmethod
    def _hub_file(where: str, entry: dict[str, Any]) -> Path:
        """A hub adapter (`hub_id`, optional `weight_name` and `revision`) in the local hub cache, downloaded into
        it first unless HF_HUB_OFFLINE=1: every process resolves the same file (share the cache like the model)."""
        if "file" in entry:
            raise RegistryError(f"{where}: give `file` or `hub_id`, not both")
        hub_id, weight = entry["hub_id"], entry.get("weight_name", HUB_WEIGHT_NAME)
        if not isinstance(hub_id, str) or not HUB_ID_RE.match(hub_id):
            raise RegistryError(f"{where}: `hub_id` must be a hub repository id (`org/name`), not {hub_id!r}")
        if not isinstance(weight, str) or not weight.endswith(".safetensors") or ".." in weight:
            raise RegistryError(f"{where}: `weight_name` must be a `.safetensors` file of the repository, "
                                f"not {weight!r}")
        from huggingface_hub import hf_hub_download  # the hub client: only registries that name hub ids need it

        try:
            return Path(hf_hub_download(hub_id, weight, revision=entry.get("revision")))
        except Exception as exc:  # offline and not cached, unknown repo or file, network: all say why
            raise RegistryError(f"{where}: `{hub_id}` file `{weight}` could not be resolved "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from None

    def _preset(self, name: str, entry: Any, adapters: dict[str, Adapter]) -> Preset:
        where = f"{MANIFEST}: preset `{name}`"
        if not NAME_RE.match(name):
            raise RegistryError(f"{where}: names are 1-64 letters, digits, `.`, `_` or `-`")
        if not isinstance(entry, dict):
            raise RegistryError(f"{where} must be an object")
        unknown = set(entry) - {"adapter", "adapter_scale", "scheduler", "scheduler_config", "steps", "steps_min",
                                "steps_max", "guidance_scale", "description", "refiner"}
        if unknown:
            raise RegistryError(f"{where}: unknown keys {sorted(unknown)}")
        adapter = entry.get("adapter")
        if adapter is not None and adapter not in adapters:
            raise RegistryError(f"{where}: adapter `{adapter}` is not in the registry")
        scheduler = entry.get("scheduler", "euler")
        if scheduler not in SCHEDULERS:
            raise RegistryError(f"{where}: scheduler `{scheduler}` is not one of {', '.join(SCHEDULERS)}")
        config = entry.get("scheduler_config") or {}
        if not isinstance(config, dict) or set(config) - SCHEDULER_CONFIG_KEYS:
            raise RegistryError(f"{where}: scheduler_config keys must be among {sorted(SCHEDULER_CONFIG_KEYS)}")
        if entry.get("refiner", "none") != "none":
            raise RegistryError(f"{where}: `refiner` can only be `none` (presets run base-only by default)")
        steps = int(entry.get("steps", 4))
        lo, hi = int(entry.get("steps_min", 1)), int(entry.get("steps_max", max(steps, 8)))
        if not 1 <= lo <= steps <= hi:
            raise RegistryError(f"{where}: steps_min <= steps <= steps_max must hold, not {lo}, {steps}, {hi}")
        return Preset(name=name, adapter=adapter, adapter_scale=float(entry.get("adapter_scale", 1.0)),
                      scheduler=scheduler, scheduler_config=dict(config), steps=steps, steps_min=lo, steps_max=hi,
                      guidance_scale=float(entry.get("guidance_scale", 1.0)),
                      description=str(entry.get("description", "")))


@lru_cache(maxsize=8)
def registry_for(root: str | None, deployment_base: str = "sdxl") -> Registry:
    """One Registry per folder and process (its hash cache lives as long as the process)."""
    return Registry(Path(root) if root else None, deployment_base)
