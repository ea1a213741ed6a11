"""The delta file (DESIGN.md §5): save, load, verify, apply, revert and merge sparse deltas.

A delta holds, per targeted module `M`, sorted flat indices into `M.weight` and the values added
there, plus dense extras (e.g. a new classification head) copied over the named tensors. On disk it
is one safetensors file: `M.indices`, `M.values`, `extra.<name>`, and string metadata.

Decisions kept here once:
- Index dtype is int32, int64 only when the weight has ≥ 2**31 entries (`index_dtype`); any other
  index dtype is refused when the delta meets a model.
- `apply_delta` saves the k original entries (never a dense copy) and the originals of the extras on
  the model; `revert_delta` writes them back (bit-exact, never by subtraction). One delta at a time:
  applying or merging while a delta is applied, or reverting when none is, raises DeltaStateError.
- The entry update is `W[idx] = (W[idx] + values)` computed in the promoted dtype of weight and
  values, rounded once to the weight dtype.
- Structural checks (modules exist, have a contiguous `.weight`, indices in range, extras' shapes)
  always run; `verify=False` skips only the fingerprint, the one costly check.
- Optional metadata: `mask`, `scope`, and CHAT_TEMPLATE_KEY (the chat template the job rendered
  its conversations with, for serving: speft_core/chat.py); other keys are kept as they are.
- `values_dtype` (e.g. "float32") names the dtype of every `M.values`; written on save, checked
  on load where present (files from before it lack it and still load). Trained values are float32
  whatever the base dtype; applying to a bf16 base adds in float32 and rounds once (above).
- A file must carry every REQUIRED_METADATA key; an in-memory Delta needs only `base_fingerprint`
  (and only when verified), so a trainer can evaluate a delta before it has full metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save
from torch import nn

from .config import TASKS
from .errors import DeltaFormatError, DeltaMismatchError, DeltaStateError
from .safetensors_bytes import canonical_safetensors

FORMAT = "speft-delta/1"
REQUIRED_METADATA: tuple[str, ...] = (
    "format",
    "base_model",
    "base_fingerprint",
    "metric",
    "density",
    "nnz",
    "task",
    "labels",
)
CHAT_TEMPLATE_KEY = "chat_template"  # optional: the Jinja chat template a chat-trained delta used
EXTRA_PREFIX = "extra."
INDICES_SUFFIX = ".indices"
VALUES_SUFFIX = ".values"
INT32_LIMIT = 2**31  # weights with at least this many entries need int64 indices

_APPLIED_ATTR = "_speft_applied"
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_INDEX_DTYPES = (torch.int32, torch.int64)




@dataclass(eq=False)
class Delta:
    """A sparse delta in memory: module -> (sorted flat indices, values), dense extras, metadata."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        """Number of trained sparse entries over all modules (extras not counted)."""
        return sum(int(indices.numel()) for indices, _ in self.modules.values())

    @property
    def labels(self) -> list[str]:
        """Class labels from the `labels` metadata (empty when absent, e.g. causal LM)."""
        return _parse_labels(self.metadata.get("labels", "[]"))


@dataclass(eq=False)
class _AppliedState:
    """What apply_delta changed: the delta and the original entries / extras to restore."""

    delta: Delta
    entries: dict[
        str, tuple[torch.Tensor, torch.Tensor]
    ]  # module -> (long indices, original values)
    extras: dict[str, torch.Tensor]  # tensor name -> original copy


def index_dtype(numel: int) -> torch.dtype:
    """Dtype of flat indices into a weight of `numel` entries: int32 below 2**31, else int64."""
    return torch.int64 if numel >= INT32_LIMIT else torch.int32


def fingerprint(model: nn.Module, module_names: Iterable[str]) -> str:
    """sha256 hex over name, shape, dtype and raw bytes of each named module's weight, sorted."""
    digest = hashlib.sha256()
    for name in sorted(set(module_names)):
        weight = _module_weight(model, name).detach().to("cpu").contiguous()
        digest.update(f"{name}\n{list(weight.shape)}\n{weight.dtype}\n".encode())
        digest.update(weight.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def delta_to_bytes(delta: Delta) -> bytes:
    """Serialise a delta to safetensors bytes (fills `format`, `nnz`); refuses what load refuses."""
    metadata = {**delta.metadata}
    for key, value in (("format", FORMAT), ("nnz", str(delta.nnz))):
        if metadata.setdefault(key, value) != value:
            raise DeltaFormatError(
                f"metadata {key}={metadata[key]!r} but the delta has {key}={value!r}"
            )
    _check_metadata(metadata, delta.nnz)
    recorded = values_dtype_name(delta)
    if recorded is not None:
        metadata.setdefault("values_dtype", recorded)
    _check_values_dtype(metadata, delta)
    tensors: dict[str, torch.Tensor] = {}
    for name, (indices, values) in delta.modules.items():
        if not name or name.startswith(EXTRA_PREFIX):
            raise DeltaFormatError(f"module name {name!r} is empty or starts with {EXTRA_PREFIX!r}")
        _check_entries(name, indices, values)
        tensors[name + INDICES_SUFFIX] = _cpu_copy(indices)
        tensors[name + VALUES_SUFFIX] = _cpu_copy(values)
    for name, tensor in delta.extras.items():
        if not name:
            raise DeltaFormatError("extra tensor with an empty name")
        _check_extra(name, tensor)
        tensors[EXTRA_PREFIX + name] = _cpu_copy(tensor)
    return canonical_safetensors(_safetensors_save(tensors, metadata=metadata))


def save_delta(delta: Delta, path: str | os.PathLike[str]) -> None:
    """Write a delta file atomically (temporary file in the same folder, then rename)."""
    blob = delta_to_bytes(delta)
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=".delta-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(blob)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved delta is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_delta(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> Delta:
    """Read a delta from a path or bytes; anything malformed raises DeltaFormatError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        with open(source, "rb") as handle:
            data = handle.read()
    metadata = _read_header_metadata(data)
    try:
        tensors = _safetensors_load(data)
    except Exception as err:  # the parser's own error types vary by version; all mean "unreadable"
        raise DeltaFormatError(f"not a readable safetensors file: {err}") from err
    modules, extras = _split_tensors(tensors)
    delta = Delta(modules=modules, extras=extras, metadata=metadata)
    _check_metadata(metadata, delta.nnz)
    _check_values_dtype(metadata, delta)
    return delta


def values_dtype_name(delta: Delta) -> str | None:
    """The one dtype of the delta's values ("float32", ...), None when it has no modules."""
    names = {str(values.dtype).removeprefix("torch.") for _, values in delta.modules.values()}
    if len(names) > 1:
        raise DeltaFormatError(f"the values mix dtypes ({', '.join(sorted(names))})")
    return names.pop() if names else None


def _check_values_dtype(metadata: dict[str, str], delta: Delta) -> None:
    recorded = metadata.get("values_dtype")
    actual = values_dtype_name(delta)
    if recorded is not None and actual is not None and recorded != actual:
        raise DeltaFormatError(f"metadata values_dtype={recorded!r} but the values are {actual}")


def verify_delta(model: nn.Module, delta: Delta, *, check_fingerprint: bool = True) -> None:
    """Check that `delta` fits `model` (modules, index ranges, extras, fingerprint) or raise.

    `check_fingerprint=False` skips only the fingerprint (for callers that memoise it).
    """
    _resolve_targets(model, delta)
    if check_fingerprint:
        _check_fingerprint(model, delta)


def apply_delta(model: nn.Module, delta: Delta, *, verify: bool = True) -> None:
    """Add the delta to the model in place, saving the touched entries so revert_delta is exact."""
    if applied_delta(model) is not None:
        raise DeltaStateError("a delta is already applied to this model; revert it first")
    entries, extras = _resolve_targets(model, delta)
    if verify:
        _check_fingerprint(model, delta)
    state = _AppliedState(delta=delta, entries={}, extras={})
    try:
        with torch.no_grad():
            for name, (weight, indices, values) in entries.items():
                flat = weight.view(-1)
                original = flat.index_select(0, indices)
                state.entries[name] = (indices, original)
                flat.index_put_((indices,), added_entries(original, values, weight.dtype))
            for name, (target, value) in extras.items():
                state.extras[name] = target.detach().clone()
                target.copy_(value)
    except BaseException:
        _restore(model, state)
        raise
    model.__dict__[_APPLIED_ATTR] = state


def revert_delta(model: nn.Module) -> None:
    """Restore what apply_delta saved, bit for bit; DeltaStateError if no delta is applied."""
    state = model.__dict__.get(_APPLIED_ATTR)
    if state is None:
        raise DeltaStateError("no delta is applied to this model")
    _restore(model, state)
    del model.__dict__[_APPLIED_ATTR]


def merge_delta(model: nn.Module, delta: Delta, *, verify: bool = True) -> None:
    """Add the delta to the model for good (no revert); refused while a delta is applied."""
    apply_delta(model, delta, verify=verify)
    del model.__dict__[_APPLIED_ATTR]  # forget the k saved originals: the change stays


def applied_delta(model: nn.Module) -> Delta | None:
    """The delta currently applied to `model` by apply_delta, or None."""
    state = model.__dict__.get(_APPLIED_ATTR)
    return state.delta if state is not None else None


# --- checks -------------------------------------------------------------------------------------


def _check_entries(name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Intrinsic validity of one module's entries (no model needed)."""
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise DeltaFormatError(f"module {name!r}: indices and values must be tensors")
    if indices.dtype not in _INDEX_DTYPES:
        raise DeltaFormatError(
            f"module {name!r}: indices must be int32 or int64, got {indices.dtype}"
        )
    if not values.is_floating_point():
        raise DeltaFormatError(
            f"module {name!r}: values must be floating point, got {values.dtype}"
        )
    if indices.dim() != 1 or values.dim() != 1:
        raise DeltaFormatError(f"module {name!r}: indices and values must be 1-D")
    if indices.numel() != values.numel():
        raise DeltaFormatError(
            f"module {name!r}: {indices.numel()} indices but {values.numel()} values"
        )
    if indices.numel() and int(indices[0]) < 0:
        raise DeltaFormatError(f"module {name!r}: negative index {int(indices[0])}")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise DeltaFormatError(f"module {name!r}: indices must be sorted and free of duplicates")
    if not bool(torch.isfinite(values).all()):
        raise DeltaFormatError(f"module {name!r}: values contain NaN or Inf")


def _check_extra(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise DeltaFormatError(f"extra {name!r} must be a tensor")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise DeltaFormatError(f"extra {name!r} contains NaN or Inf")


def _check_metadata(metadata: dict[str, str], nnz: int) -> None:
    """The metadata a file must carry (DESIGN.md §5), consistent with the tensors."""
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise DeltaFormatError(f"metadata is missing {', '.join(repr(k) for k in missing)}")
    bad = [
        key
        for key, value in metadata.items()
        if not isinstance(key, str) or not isinstance(value, str)
    ]
    if bad:
        raise DeltaFormatError(f"metadata {bad[0]!r} must be a string")
    if metadata["format"] != FORMAT:
        raise DeltaFormatError(f"format is {metadata['format']!r}; this reader supports {FORMAT!r}")
    if metadata["nnz"] != str(nnz):
        raise DeltaFormatError(f"metadata nnz={metadata['nnz']!r} but the file holds {nnz} entries")
    if not _FINGERPRINT_RE.fullmatch(metadata["base_fingerprint"]):
        raise DeltaFormatError("base_fingerprint must be 64 lowercase hex digits (sha256)")
    if metadata["task"] not in TASKS:
        raise DeltaFormatError(f"task must be one of {', '.join(TASKS)}; got {metadata['task']!r}")
    _parse_labels(metadata["labels"])


def _parse_labels(text: str) -> list[str]:
    try:
        labels = json.loads(text)
    except (TypeError, ValueError, RecursionError) as err:  # also too deep, too many digits
        raise DeltaFormatError(f"metadata labels is not JSON: {err}") from err
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise DeltaFormatError("metadata labels must be a JSON list of strings")
    return labels


def _read_header_metadata(data: bytes) -> dict[str, str]:
    """Parse the safetensors header here: clear errors for foreign or truncated bytes."""
    if len(data) < 8:
        raise DeltaFormatError("not a safetensors file: shorter than its 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise DeltaFormatError("not a safetensors file, or truncated: header runs past the end")
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError) as err:  # not UTF-8 or JSON, too deep, too many digits
        raise DeltaFormatError(f"not a safetensors file: header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise DeltaFormatError("not a safetensors file: header is not a JSON object")
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    body = len(data) - 8 - size
    if ends and all(isinstance(end, int) for end in ends) and max(ends) != body:
        raise DeltaFormatError(
            f"truncated or padded file: tensors need {max(ends)} data bytes, the file has {body}"
        )
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise DeltaFormatError("safetensors __metadata__ is not an object")
    return metadata


def _split_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Group `M.indices`/`M.values` pairs into modules and `extra.*` into extras, checking each."""
    indices: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(EXTRA_PREFIX) and len(key) > len(EXTRA_PREFIX):
            extras[key[len(EXTRA_PREFIX) :]] = tensor
        elif key.endswith(INDICES_SUFFIX) and len(key) > len(INDICES_SUFFIX):
            indices[key[: -len(INDICES_SUFFIX)]] = tensor
        elif key.endswith(VALUES_SUFFIX) and len(key) > len(VALUES_SUFFIX):
            values[key[: -len(VALUES_SUFFIX)]] = tensor
        else:
            raise DeltaFormatError(f"unexpected tensor {key!r} (not .indices, .values or extra.)")
    for name in sorted(set(indices) ^ set(values)):
        present, absent = (
            (INDICES_SUFFIX, VALUES_SUFFIX) if name in indices else (VALUES_SUFFIX, INDICES_SUFFIX)
        )
        raise DeltaFormatError(f"module {name!r} has {name + present!r} but no {name + absent!r}")
    modules = {name: (indices[name], values[name]) for name in sorted(indices)}
    for name, (idx, vals) in modules.items():
        _check_entries(name, idx, vals)
    for name, tensor in extras.items():
        _check_extra(name, tensor)
    return modules, extras


def _resolve_targets(
    model: nn.Module, delta: Delta
) -> tuple[
    dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    dict[str, tuple[torch.Tensor, torch.Tensor]],
]:
    """Match delta to model: (weight, long indices, values) a module, (target, value) an extra."""
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, (indices, values) in delta.modules.items():
        _check_entries(name, indices, values)
        weight = _module_weight(model, name)
        numel = weight.numel()
        if indices.dtype != index_dtype(numel):
            raise DeltaFormatError(
                f"module {name!r}: indices into {numel} entries must be "
                f"{index_dtype(numel)}, got {indices.dtype}"
            )
        if indices.numel() and int(indices[-1]) >= numel:
            raise DeltaMismatchError(
                f"module {name!r}: index {int(indices[-1])} is out of range for a weight of "
                f"shape {list(weight.shape)} ({numel} entries)"
            )
        if not weight.is_contiguous():
            raise DeltaMismatchError(f"module {name!r}: weight is not contiguous")
        entries[name] = (
            weight,
            indices.to(device=weight.device, dtype=torch.long),
            values.to(device=weight.device),
        )
    extras: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, value in delta.extras.items():
        _check_extra(name, value)
        target = _named_tensor(model, name)
        if tuple(target.shape) != tuple(value.shape):
            raise DeltaMismatchError(
                f"extra {name!r}: shape {list(value.shape)} does not match "
                f"the model's {list(target.shape)}"
            )
        extras[name] = (target, value.to(device=target.device))
    return entries, extras


def _check_fingerprint(model: nn.Module, delta: Delta) -> None:
    check_fingerprint_matches(delta, fingerprint(model, delta.modules))


def check_fingerprint_matches(delta: Delta, actual: str) -> None:
    """Raise DeltaMismatchError unless `actual` (the base's fingerprint) is the delta's."""
    expected = delta.metadata.get("base_fingerprint")
    if not expected:
        raise DeltaFormatError("metadata has no base_fingerprint to verify against")
    if actual != expected:
        base = delta.metadata.get("base_model", "?")
        raise DeltaMismatchError(
            f"this delta was trained on another base (base_model={base!r}): fingerprint "
            f"{expected[:12]}… expected, this model's targeted weights give {actual[:12]}…"
        )


def _module_weight(model: nn.Module, name: str) -> torch.Tensor:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise DeltaMismatchError(f"module {name!r} does not exist in this model") from err
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise DeltaMismatchError(f"module {name!r} ({type(module).__name__}) has no weight tensor")
    return weight


def _named_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError as err:
        raise DeltaMismatchError(
            f"extra {name!r}: module {owner!r} does not exist in this model"
        ) from err
    tensor = getattr(module, attr, None)
    if not isinstance(tensor, torch.Tensor):
        raise DeltaMismatchError(f"extra {name!r}: no such parameter or buffer in this model")
    return tensor


# --- tensor updates -----------------------------------------------------------------------------


def added_entries(original: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """original + values in their promoted dtype, rounded once to `dtype` (the one update rule:
    apply_delta and the serving swap both use it, so a swap equals the merge bit for bit)."""
    common = torch.promote_types(original.dtype, values.dtype)
    return (original.to(common) + values.to(common)).to(dtype)


def _restore(model: nn.Module, state: _AppliedState) -> None:
    """Write back the saved originals in reverse order (so shared weights come out right)."""
    with torch.no_grad():
        for name, original in reversed(list(state.extras.items())):
            target = _named_tensor(model, name)
            target.copy_(original)
        for name, (indices, original) in reversed(list(state.entries.items())):
            weight = _module_weight(model, name)
            weight.view(-1).index_put_(
                (indices.to(weight.device),), original.to(device=weight.device, dtype=weight.dtype)
            )


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached contiguous CPU copy sharing no memory (safetensors refuses shared storage)."""
    return tensor.detach().to("cpu", copy=True).contiguous()
