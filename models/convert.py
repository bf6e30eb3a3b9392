"""HF checkpoint <-> pipeline layer files, driven only by a family's `weight_map` (plus optional hooks).

Both directions stream: hg_to_pp reads one safetensors shard at a time and writes each layer file as
soon as all its tensors have arrived; pp_to_hg reads one layer file at a time and flushes safetensors
shards of at most `max_shard_size`. The expected tensors (names and shapes) come from building the
layers from config.json on the meta device, so every source tensor must be consumed and every target
filled, and a mismatch is an error naming the tensor. Reading HF files (config.json, safetensors, `.bin`) is
`models/hf_files.py`'s job; the pipeline side's file layout is `models/layout.py`'s.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .common import ModelError, ModelOptions
from .family import Family, WeightRule
from .hf_files import (AUX_FILE_PATTERNS, SAFETENSORS_INDEX, check_hf_weight_files, error_reason, hf_weight_files,
                       iter_hf_tensors, open_safetensors, read_hf_config, resolve_hf_source)
from .layout import check_layer_tensors, check_no_extra_layers, layer_file_name, load_layer_file, resolve_pp_dir
from .registry import REGISTRY
from .resolved import ResolvedModel, resolve_dir

KINDS = ("enter", "block", "exit")
EXTRA_TENSORS = "extra_tensors.safetensors"  # tensors outside the pipeline model, carried verbatim (see below)


# ----------------------------------------------------------------------------------------------
# Model description derived from config.json


@dataclass
class ModelInfo:
    """A resolved model (family + parsed args) and per layer file the expected local tensors (name -> meta tensor)."""
    model: ResolvedModel
    layer_tensors: list[dict[str, torch.Tensor]]

    @property
    def family(self) -> Family:
        return self.model.family

    @property
    def args(self) -> Any:
        return self.model.args

    @property
    def hf_cfg(self) -> dict:
        return self.model.hf_config

    @property
    def num_blocks(self) -> int:
        return self.model.num_blocks

    def kind_of(self, idx: int) -> tuple[str, int | None]:
        """File index -> ('enter', None) | ('block', block index) | ('exit', None)."""
        if idx == 0:
            return "enter", None
        if idx <= self.num_blocks:
            return "block", idx - 1
        return "exit", None


def model_info(cfg_dir: str | Path) -> ModelInfo:
    """Build every layer that owns a file on the meta device to learn its tensor names and shapes."""
    model = resolve_dir(cfg_dir)
    with torch.device("meta"):
        specs = model.specs(ModelOptions())
        layer_tensors = [dict(spec.build().state_dict()) for spec in specs[:model.num_pipeline_layers]]
    return ModelInfo(model, layer_tensors)


# ----------------------------------------------------------------------------------------------
# The weight map, compiled


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))


class WeightMapper:
    """Translate names both ways with one table of `WeightRule`s.

    to_pp: HF name -> (kind, block index, local key), or None for a dropped tensor.
    to_hf: (kind, block index, local key) -> HF name.
    """

    def __init__(self, rules: tuple[WeightRule, ...]):
        self.rules = [(rule, _pattern_regex(rule.hf),
                       _pattern_regex(rule.local) if rule.local is not None else None) for rule in rules]

    def to_pp(self, hf_name: str) -> tuple[str, int | None, str] | None:
        for rule, hf_re, _ in self.rules:
            match = hf_re.fullmatch(hf_name)
            if match is None:
                continue
            if rule.kind is None:
                return None
            groups = [int(g) for g in match.groups()]
            block = groups.pop(0) if rule.kind == "block" else None
            return rule.kind, block, rule.local.format(*groups)
        raise ModelError(f"unexpected tensor '{hf_name}': no weight-map rule matches it")

    def to_hf(self, kind: str, block: int | None, local: str) -> str:
        for rule, _, local_re in self.rules:
            if rule.kind != kind or local_re is None:
                continue
            match = local_re.fullmatch(local)
            if match is not None:
                extras = [int(g) for g in match.groups()]
                return rule.hf.format(*([block] if kind == "block" else []), *extras)
        raise ModelError(f"no weight-map rule for pipeline tensor '{local}' of a {kind} layer")


def _identity_hook(args: Any, kind: str, tensors: dict) -> dict:
    return tensors


def _hook(family: Family, direction: str) -> Callable[[Any, str, dict], dict]:
    hook = family.to_pp_hook if direction == "to_pp" else family.to_hf_hook
    return hook or _identity_hook


def layer_to_hf(info: ModelInfo, mapper: WeightMapper, idx: int,
                local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Local tensors of layer file `idx` -> {HF name: tensor} (also used on meta tensors for planning)."""
    kind, block = info.kind_of(idx)
    local = _hook(info.family, "to_hf")(info.args, kind, local)
    return {mapper.to_hf(kind, block, key): tensor for key, tensor in local.items()}


def layer_to_pp(info: ModelInfo, mapper: WeightMapper, idx: int,
                hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{HF name: tensor} of layer file `idx` -> its local state_dict, checked against config.json."""
    kind, block = info.kind_of(idx)
    local = {}
    for name, tensor in hf.items():
        target = mapper.to_pp(name)
        if target is None or target[:2] != (kind, block):
            raise ModelError(f"tensor '{name}' does not belong to pipeline layer {idx}")
        local[target[2]] = tensor
    local = _hook(info.family, "to_pp")(info.args, kind, local)
    check_layer_tensors(local, {k: v.shape for k, v in info.layer_tensors[idx].items()}, layer_file_name(idx))
    return local


@dataclass
class HfPlan:
    """Every HF tensor the config implies: name -> (layer file index, shape)."""
    targets: dict[str, tuple[int, torch.Size]]
    per_layer: list[set[str]]


def plan_hf_tensors(info: ModelInfo, mapper: WeightMapper) -> HfPlan:
    targets: dict[str, tuple[int, torch.Size]] = {}
    per_layer = []
    for idx, tensors in enumerate(info.layer_tensors):
        names = layer_to_hf(info, mapper, idx, dict(tensors))
        targets.update({name: (idx, t.shape) for name, t in names.items()})
        per_layer.append(set(names))
    return HfPlan(targets, per_layer)


# ----------------------------------------------------------------------------------------------
# Output handling


class WriteError(ModelError):
    """A file of the output could not be written (full disk, quota, I/O error)."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write of `path` (OSError, torch's RuntimeError, safetensors' error) into one WriteError
    naming the file."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        raise WriteError(f"cannot write {path}: {error_reason(err)}") from None


def save_layer(state: dict[str, torch.Tensor], path: Path) -> None:
    """torch.save through a Python file object, so a full disk surfaces as OSError(ENOSPC), not as torch's
    'unexpected pos' RuntimeError."""
    with writing(path), open(path, "wb") as f:
        torch.save(state, f)


@contextmanager
def staged_output(target: str | Path, overwrite: bool, sources: list[Path]) -> Iterator[Path]:
    """Yield a temp dir next to `target`; on success it replaces `target`, on error it is removed.

    An existing `target` (with `overwrite`) is moved aside before the new output takes its name and deleted
    only after that: a failure at any point leaves either the old output or the new one under `target`,
    never a partial one (the temp dir's name starts with '.' and never looks like a finished output).
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise ModelError(f"save path {target} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise ModelError(f"save path {target} exists and is not empty (pass --overwrite to replace it)")
    resolved = target.resolve()
    for src in sources:
        src = src.resolve()
        if src == resolved or resolved in src.parents:
            raise ModelError(f"save path {target} contains the input {src}; choose another save path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise ModelError(f"cannot write to save path {target}: {error_reason(err)}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except WriteError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        state = "left as it was" if target.exists() else "not created"
        raise WriteError(f"{err}; the partial output was removed and {target} was {state}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except OSError as err:
        if old is not None and (old / target.name).exists() and not target.exists():
            os.replace(old / target.name, target)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise ModelError(f"cannot move the new output into {target}: {error_reason(err)}; "
                         f"{target} is unchanged") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_patterns(src_dirs: list[Path], dst: Path, patterns: tuple[str, ...]) -> list[str]:
    """Copy the files of `src_dirs` matching `patterns` into `dst`; the first directory wins a name clash."""
    copied = []
    for src in src_dirs:
        for pattern in patterns:
            for path in sorted(src.glob(pattern)):
                if path.is_file() and not (dst / path.name).exists():
                    with writing(dst / path.name):
                        shutil.copy2(path, dst / path.name)
                    copied.append(path.name)
    return copied


def copy_aux_files(src_dirs: list[Path], dst: Path) -> list[str]:
    """Copy config, generation config, tokenizer and `*.py` files; the first directory wins a name clash."""
    return copy_patterns(src_dirs, dst, AUX_FILE_PATTERNS)


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor owning exactly its storage, so `torch.save` never writes a larger shared buffer."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------
# HF -> pipeline


class _LayerCollector:
    """Route HF tensors to layer files; `add` returns a layer index once all its tensors are in."""

    def __init__(self, info: ModelInfo, mapper: WeightMapper):
        self.info, self.mapper = info, mapper
        self.plan = plan_hf_tensors(info, mapper)
        self.pending: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        self.done: set[int] = set()
        self.dropped: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> int | None:
        if name not in self.plan.targets:
            self._drop_or_fail(name)
            return None
        idx, shape = self.plan.targets[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ModelError(f"tensor '{name}' has shape {tuple(tensor.shape)}, config.json implies {tuple(shape)}")
        self.pending[idx][name] = tensor
        return idx if len(self.pending[idx]) == len(self.plan.per_layer[idx]) else None

    def _drop_or_fail(self, name: str) -> None:
        family = self.info.family
        if family.tied(self.info.args) and name in family.tied_hf_names:
            self.dropped.append(name)
            return
        target = self.mapper.to_pp(name)
        if target is not None:
            raise ModelError(f"unexpected tensor '{name}': not part of the model described by config.json "
                             f"({self.info.num_blocks} layers, tie_word_embeddings="
                             f"{family.tied(self.info.args)})")
        self.dropped.append(name)

    def empty_layers(self) -> list[int]:
        """Layers with no tensors at all (none for llama) never complete by arrival: write them upfront."""
        return [idx for idx, names in enumerate(self.plan.per_layer) if not names]

    def take(self, idx: int) -> dict[str, torch.Tensor]:
        self.done.add(idx)
        return layer_to_pp(self.info, self.mapper, idx, self.pending.pop(idx))

    def check_complete(self) -> None:
        for idx, names in enumerate(self.plan.per_layer):
            if idx not in self.done:
                missing = sorted(names - set(self.pending.get(idx, {})))
                raise ModelError(f"missing tensor '{missing[0]}' in the HF checkpoint"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def canonical_hf_tensors(info: ModelInfo, tensors: Iterator[tuple[str, torch.Tensor]]
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors under the weight map's names: the family's `canonical_hf_name` respelling, then its
    `from_hf_tensor` rewrite (which may split one tensor into several). A name produced twice is an error."""
    canonical = info.family.canonical_hf_name or (lambda name: name)
    rewrite = info.family.from_hf_tensor
    seen: set[str] = set()
    for name, tensor in tensors:
        parts = rewrite(info.args, canonical(name), tensor) if rewrite else {canonical(name): tensor}
        for part_name, part in parts.items():
            if part_name in seen:
                raise ModelError(f"tensor '{part_name}' appears twice in the checkpoint (last from '{name}')")
            seen.add(part_name)
            yield part_name, part


class _Carried:
    """Checkpoint tensors outside the pipeline model (`Family.carried_hf_prefixes`), kept verbatim, and the
    checkpoint's own spelling of every name `canonical_hf_name` changed ({weight-map name: checkpoint name})."""

    def __init__(self, family: Family):
        self.prefixes = family.carried_hf_prefixes
        self.canonical = family.canonical_hf_name
        self.tensors: dict[str, torch.Tensor] = {}
        self.hf_names: dict[str, str] = {}

    def pipeline_tensors(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """`tensors` less the carried ones (held back here); the respellings are noted on the way."""
        for name, tensor in tensors:
            if name.startswith(self.prefixes):
                self.tensors[name] = tensor
                continue
            if self.canonical is not None and self.canonical(name) != name:
                self.hf_names[self.canonical(name)] = name
            yield name, tensor

    def save(self, path: Path) -> None:
        """`extra_tensors.safetensors`: the carried tensors, the respellings as JSON in its metadata."""
        from safetensors.torch import save_file

        with writing(path):
            save_file(self.tensors, str(path), metadata={"format": "pt", "hf_names": json.dumps(self.hf_names)})


def read_carried(family: Family, dirs: list[Path]) -> tuple[Path | None, dict[str, str]]:
    """(`extra_tensors.safetensors` of the first of `dirs` holding one, its {weight-map name: checkpoint name});
    (None, {}) for a family that carries nothing. Missing for a family that does: ModelError, since the export
    would lack tensors its config.json describes."""
    if not family.carried_hf_prefixes:
        return None, {}
    path = next((d / EXTRA_TENSORS for d in dirs if (d / EXTRA_TENSORS).is_file()), None)
    if path is None:
        raise ModelError(f"no {EXTRA_TENSORS} in {dirs[0]}: model_type '{family.model_type}' keeps the tensors it does "
                         f"not train ({', '.join(family.carried_hf_prefixes)}) there; copy it from the hg_to_pp output")
    with open_safetensors(path) as handle:
        text = (handle.metadata() or {}).get("hf_names", "{}")
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise ModelError(f"{path}: metadata 'hf_names' is not a JSON object of names")
    return path, names


def hg_to_pp(input_path: str | Path, save_path: str | Path, overwrite: bool = False,
             log: Callable[[str], None] = print) -> Path:
    """HF checkpoint (dir or hub id) -> `save_path/layer_XX-model_states.pt` + config/tokenizer files (+
    `extra_tensors.safetensors` for a family with `carried_hf_prefixes`, held in memory until written)."""
    src = resolve_hf_source(input_path)
    info = model_info(src)
    mapper = WeightMapper(info.family.weight_map)
    files = hf_weight_files(src)
    collector = _LayerCollector(info, mapper)
    carried = _Carried(info.family)
    with staged_output(save_path, overwrite, [src]) as tmp:
        for idx in collector.empty_layers():
            save_layer(collector.take(idx), tmp / layer_file_name(idx))
        for name, tensor in canonical_hf_tensors(info, carried.pipeline_tensors(iter_hf_tensors(files))):
            idx = collector.add(name, tensor)
            if idx is not None:
                local = collector.take(idx)
                save_layer({k: _standalone(v) for k, v in local.items()}, tmp / layer_file_name(idx))
        collector.check_complete()
        if carried.prefixes:
            carried.save(tmp / EXTRA_TENSORS)
            log(f"carried {len(carried.tensors)} tensor(s) outside the pipeline model verbatim into {EXTRA_TENSORS}")
        copy_aux_files([src], tmp)
    if collector.dropped:
        log(f"dropped {len(collector.dropped)} tensor(s) not used by the pipeline: {', '.join(collector.dropped[:4])}"
            + (" ..." if len(collector.dropped) > 4 else ""))
    log(f"wrote {len(info.layer_tensors)} layer files to {save_path}; peak RSS {peak_rss_mib():.0f} MiB")
    return Path(save_path)


# ----------------------------------------------------------------------------------------------
# Pipeline -> HF


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '100KB' / '1GiB' / 12345 -> bytes (decimal units, like transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if match is None:
        raise ModelError(f"--max-shard-size: cannot parse '{size}' (examples: 5GB, 500MB)")
    unit = (match.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if "I" in unit else 1000
    value = int(float(match.group(1)) * base ** power)
    if value <= 0:
        raise ModelError(f"--max-shard-size must be positive, got '{size}'")
    return value


class ShardWriter:
    """Accumulate tensors and flush safetensors shards of at most `max_bytes` (a larger tensor gets its own)."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        part = self._part(len(self.shards))
        with writing(part):
            save_file(self.current, str(part), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def _part(self, i: int) -> Path:
        return self.out_dir / f"model-{i + 1:05d}.safetensors.part"

    def finish(self) -> int:
        """Name the shards `model-0000i-of-0000N.safetensors` (+ index), or `model.safetensors` if one."""
        self.flush()
        if len(self.shards) == 1:
            os.replace(self._part(0), self.out_dir / "model.safetensors")
            return 1
        total, weight_map = len(self.shards), {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self._part(i), self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with writing(self.out_dir / SAFETENSORS_INDEX):
            (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return total


def pp_to_hg(input_path: str | Path, save_path: str | Path, overwrite: bool = False,
             max_shard_size: str | int = "5GB", log: Callable[[str], None] = print,
             hf_format: str | None = None, adapter_only: bool = False, base_path: str | Path | None = None) -> Path:
    """Pipeline layer files (converted dir or training checkpoint) -> sharded HF safetensors dir.

    `hf_format` names one of the family's `hf_formats` (e.g. 'glm' for chatglm): tensors are renamed
    and config.json replaced so the result is a checkpoint of that other model_type.

    A LoRA checkpoint (LORA.json in its tag dir, `models/lora_export.py`) is merged into its base model (the one
    LORA.json records, or `base_path`; its fingerprint must match); with `adapter_only` it is written as a PEFT
    adapter directory instead (adapter_config.json + adapter_model.safetensors, HF names of `hf_format`).
    """
    from . import lora_export

    max_bytes = parse_size(max_shard_size)
    layer_dir, cfg_dirs = resolve_pp_dir(input_path)
    lora = lora_export.read_checkpoint(layer_dir)
    if lora is None and adapter_only:
        raise ModelError(f"--adapter-only: {layer_dir} is not a LoRA checkpoint (no LORA.json: full fine-tuning "
                         "or a converted model); export it without --adapter-only")
    if lora is None and base_path is not None:
        raise ModelError(f"--base-path: {layer_dir} is not a LoRA checkpoint (no LORA.json); drop --base-path")
    base_dir = lora_export.verified_base(lora, base_path) if lora is not None and not adapter_only else None
    if base_dir is not None:
        cfg_dirs = [*cfg_dirs, base_dir]
        cfg_dir = base_dir  # its config.json is the one the fingerprint covers
    else:
        cfg_dir = next((d for d in cfg_dirs if (d / "config.json").is_file()), None)
        if cfg_dir is None and lora is not None and (lora.recorded_base / "config.json").is_file():
            cfg_dir = lora.recorded_base
        if cfg_dir is None:
            raise ModelError(f"no config.json in {input_path}")
    info = model_info(cfg_dir)
    mapper = WeightMapper(info.family.weight_map)
    export = None
    if hf_format is not None:
        export = info.family.hf_formats.get(hf_format)
        if export is None:
            available = ", ".join(sorted(info.family.hf_formats)) or "none"
            raise ModelError(f"--format {hf_format} is not available for model_type '{info.family.model_type}' "
                             f"(available: {available})")
    target_cfg = export.config(info.hf_cfg) if export else info.hf_cfg
    if adapter_only:
        with staged_output(save_path, overwrite, [layer_dir, *cfg_dirs]) as tmp:
            plan = lora_export.write_adapter(lora, info, mapper, export, tmp, target_cfg, writing)
            copy_patterns(cfg_dirs, tmp, lora_export.ADAPTER_AUX_PATTERNS)
        log(f"wrote a PEFT LoRA adapter ({len(plan.lora_modules)} LoRA modules, targets "
            f"{', '.join(plan.target_modules) or 'none'}; modules_to_save {', '.join(plan.modules_to_save) or 'none'})"
            f" to {save_path}")
        return Path(save_path)
    check_no_extra_layers(layer_dir, len(info.layer_tensors))
    carried_path, hf_names = read_carried(info.family, [layer_dir, *cfg_dirs])
    layers = lora_export.LoraLayers(info, lora.config) if lora is not None else None
    with staged_output(save_path, overwrite, [layer_dir, *cfg_dirs]) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for idx, expected in enumerate(info.layer_tensors):
            if layers is not None:
                state = {k: _standalone(v) for k, v in layers.merged(base_dir, layer_dir, idx).items()}
            else:
                path, state = load_layer_file(layer_dir, idx)
                check_layer_tensors(state, {k: v.shape for k, v in expected.items()}, path.name)
            hf = layer_to_hf(info, mapper, idx, state)
            if export is not None and export.layer is not None:
                hf = export.layer(info.args, hf)
            for name, tensor in hf.items():
                for out_name, out in (export.tensors(info.args, name, tensor) if export else {name: tensor}).items():
                    writer.add(hf_names.get(out_name, out_name), out)
            del state
        if carried_path is not None:
            with open_safetensors(carried_path) as handle:
                for name in handle.keys():
                    writer.add(name, handle.get_tensor(name))
        num_shards = writer.finish()
        if export is not None:
            with writing(tmp / "config.json"):
                (tmp / "config.json").write_text(json.dumps(target_cfg, indent=2) + "\n")
        copy_aux_files(cfg_dirs, tmp)
    merged = f" (the LoRA adapters merged into the base {base_dir})" if base_dir is not None else ""
    if base_dir is not None and lora.config.quantize == "nf4":
        merged = (f" (the QLoRA adapters merged into the NF4-dequantized base {base_dir}: the 4-bit weights they "
                  f"were trained against, not the original full-precision ones)")
    log(f"wrote {num_shards} safetensors shard(s){merged} to {save_path}; peak RSS {peak_rss_mib():.0f} MiB")
    return Path(save_path)


# ----------------------------------------------------------------------------------------------
# Verify


def max_relative_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference| (robust to logits near zero)."""
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max().clamp(min=1e-30)).item()


def verify(hf_path: str | Path, pp_path: str | Path, batch: int = 2, seq_len: int = 32, seed: int = 0) -> float:
    """Max relative logit difference of the HF model and `load_sequential` (CPU fp32, same random tokens)."""
    from transformers import AutoModelForCausalLM

    from .sequential import load_sequential

    hf_dir = Path(hf_path)
    if not hf_dir.is_dir():
        raise ModelError(f"HF model directory {hf_dir} does not exist")
    hf_cfg = read_hf_config(hf_dir)
    ours = load_sequential(pp_path, torch.float32).eval()
    check_hf_weight_files(hf_dir)
    family = REGISTRY.get(hf_cfg["model_type"])
    try:
        if family is not None and family.reference_model is not None:
            reference = family.reference_model(hf_dir).float().eval()
        else:
            remote = "auto_map" in hf_cfg
            reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                             trust_remote_code=remote).eval()
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever transformers makes of a broken dir: one line naming it
        raise ModelError(f"cannot load the HF model in {hf_dir} with transformers: {error_reason(err)}") from None
    generator = torch.Generator().manual_seed(seed)
    vocab = int(reference.config.get_text_config().vocab_size)  # a multimodal config holds it in its text config
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        actual = ours(input_ids)
    if actual.shape != expected.shape:
        raise ModelError(f"logit shapes differ: pipeline {tuple(actual.shape)} vs HF {tuple(expected.shape)}")
    return max_relative_diff(actual, expected)
