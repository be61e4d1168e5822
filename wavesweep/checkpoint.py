"""The compressed checkpoint: a pruned model written in the stored-bytes encoding of
:mod:`wavesweep.accounting` (so its payload is exactly that model's ``stored_bytes``), plus a
header; and read back without pickle.

File format (version 2), all integers little-endian::

    offset 0   8 bytes   MAGIC = b"WAVSWEEP"
    offset 8   uint32    format version (2)
    offset 12  uint64    L = length of the JSON metadata
    offset 20  uint32    CRC-32 of the whole file except these 4 bytes (bytes 0-19, then 24-end)
    offset 24  L bytes   UTF-8 JSON metadata (see ``save_compressed``)
    offset 24+L          payload: the stored-bytes encoding, entry by entry in metadata["entries"] order

so ``file size == stored_bytes + header_bytes`` with ``header_bytes = 24 + L``
(:func:`read_header` returns it). The JSON holds the method, config (wavelet, mode, level,
layout, ...), user metadata, and per entry: key, kind (``dense``/``mask``/``dwt``/``alias``), shape,
dtype, and for pruned entries ``n`` (positions), ``kept``, value dtype and, for dwt, the
coefficient structure (layout, wavelet, mode, effective level, coefficient array shapes).
It also holds the payload size and the payload's CRC-32.

A tensor that ``state_dict()`` lists under several keys (tied weights, one module used twice,
a buffer registered under two names) is stored once, as ``torch.save`` stores a shared storage
once: under its pruned key when it is a target layer's weight, else under its first key; every
other key is an ``alias`` entry (``of``: the stored key) with no payload (:func:`shared_keys`).
Files of models without shared tensors have no ``alias`` entry.

The file CRC is checked before the metadata is parsed, so a flipped bit anywhere (the
wavelet name in the JSON as much as a stored value) is a ``ValueError``, never a silently
different model. Version 1 files (20-byte header, CRC over the payload only) are still read.
Whatever the bytes, reading raises only ``ValueError`` with a one-line message. Loading uses
only ``json`` and ``numpy.frombuffer`` (no pickle, no ``torch.load``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wavesweep import wavelets as wv
from wavesweep.fileio import atomic_write
from wavesweep.prune_record import PruneResult

log = logging.getLogger(__name__)

MAGIC = b"WAVSWEEP"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_FIXED_V1 = struct.Struct("<8sIQ")  # magic, version, JSON length
_FIXED = struct.Struct("<8sIQI")  # magic, version, JSON length, file CRC-32
HEADER_FIXED_BYTES = _FIXED.size  # 24
_CRC_AT = _FIXED_V1.size  # 20: where the file CRC sits (excluded from what it covers)
#: bounds on what a header may claim, checked before anything is allocated
MAX_METADATA_BYTES = 64 << 20
MAX_JSON_DEPTH = 64

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_FIXED_BYTES",
    "save_compressed",
    "read_header",
    "read_compressed",
    "load_compressed",
    "shared_keys",
]

# dtypes a checkpoint may hold (name -> (torch dtype, numpy dtype or None when numpy lacks it))
_DTYPES: dict[str, tuple[torch.dtype, np.dtype | None]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float64": (torch.float64, np.dtype("<f8")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, None),
    "int64": (torch.int64, np.dtype("<i8")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
    "bool": (torch.bool, np.dtype("?")),
}
_NAME_OF = {t: n for n, (t, _) in _DTYPES.items()}


def _dtype_name(dt: torch.dtype) -> str:
    if dt not in _NAME_OF:
        raise ValueError(f"unsupported dtype {dt} for the compressed checkpoint; supported: {', '.join(_DTYPES)}")
    return _NAME_OF[dt]


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


# --------------------------------------------------------------------------- checkpoint


def shared_keys(sd: dict[str, torch.Tensor], pruned: set[str] | frozenset[str] = frozenset()) -> dict[str, str]:
    """``{key: stored key}`` for every state-dict key whose tensor is another key's (the same
    storage, offset, shape, strides, dtype and device): ``state_dict()`` lists a shared tensor
    under each of its names. The stored key is the one in ``pruned`` (a target layer's weight)
    when there is one, else the first in ``sd`` order; it is not in the result."""
    groups: dict[tuple, list[str]] = {}
    for key, t in sd.items():
        if t.numel() == 0:  # no bytes, and no storage to tell apart
            continue
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(ident, []).append(key)
    out: dict[str, str] = {}
    for keys in groups.values():
        if len(keys) < 2:
            continue
        stored = [k for k in keys if k in pruned]
        if len(stored) > 1:  # target_layers refuses two target layers sharing a weight
            raise ValueError(f"pruned weights {stored[0]!r} and {stored[1]!r} are one tensor")
        first = stored[0] if stored else keys[0]
        out |= {k: first for k in keys if k != first}
    return out


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes (native order), without a copy when it is a contiguous CPU tensor."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _numpy_value_bytes(values: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False).view(np.uint8))


def save_compressed(result: PruneResult, path: str | os.PathLike, *, metadata: dict | None = None) -> int:
    """Write the compressed checkpoint of ``result`` to ``path``; return the file size in bytes.

    Written to a temporary file in the same folder, then renamed. ``metadata`` (JSON-
    serialisable) is stored under ``"user"``. ``file size == stored_bytes + header_bytes``.
    """
    if sys.byteorder != "little":  # the raw tensor bytes below are native order
        raise RuntimeError("save_compressed supports little-endian hosts only")
    path = Path(path)
    sd = result.model.state_dict()
    pruned = {lp.key: lp for lp in result.layers}
    missing = [k for k in pruned if k not in sd]
    if missing:
        raise ValueError(f"pruned layer weight {missing[0]!r} is not in the model's state dict")
    aliases = shared_keys(sd, set(pruned))
    entries, chunks = [], []
    for key, t in sd.items():
        e = {"key": key, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        lp = pruned.get(key)
        if key in aliases:  # another key's tensor: stored once, under that key
            e["kind"] = "alias"
            e["of"] = aliases[key]
        elif lp is None:
            e["kind"] = "dense"
            chunks.append(_tensor_bytes(t))
        else:
            keep = np.asarray(lp.keep, dtype=bool).reshape(-1)
            if keep.size != lp.n_positions:
                raise ValueError(f"{key}: mask has {keep.size} positions, expected {lp.n_positions}")
            bitmap = memoryview(np.packbits(keep))  # bit order: big (first position = MSB of byte 0)
            if lp.coeffs is not None:  # dwt: kept coefficients
                e["kind"] = "dwt"
                values = lp.coeffs[keep]
                e["value_dtype"] = _dtype_name(torch.from_numpy(values[:0]).dtype)
                e["structure"] = lp.structure.to_json()
                vbytes = _numpy_value_bytes(values)
            else:  # magnitude / random: kept weights, bit-exact at the weight's dtype
                e["kind"] = "mask"
                e["value_dtype"] = e["dtype"]
                flat = t.detach().cpu().reshape(-1)
                vbytes = _tensor_bytes(flat[torch.from_numpy(keep)])
            e["n"] = int(keep.size)
            e["kept"] = int(np.count_nonzero(keep))
            e["level_requested"] = lp.level_requested
            e["level_effective"] = lp.level_effective
            chunks.append(bitmap)
            chunks.append(vbytes)
        entries.append(e)
    payload_size = sum(c.nbytes for c in chunks)
    crc = 0
    for c in chunks:
        crc = zlib.crc32(c, crc)
    cfg = dict(result.config)
    meta = {
        "format": "wavesweep-compressed",
        "version": VERSION,
        "method": result.method,
        "config": cfg,
        "wavelet": cfg.get("wavelet"),
        "mode": cfg.get("mode"),
        "layout": cfg.get("layout"),
        "levels": {lp.name: lp.level_effective for lp in result.layers},
        "user": metadata or {},
        "entries": entries,
        "payload_bytes": payload_size,
        "payload_crc32": crc,
    }
    try:
        blob = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata for {path} is not JSON-serialisable: {e}") from None
    head = _FIXED_V1.pack(MAGIC, VERSION, len(blob))
    file_crc = zlib.crc32(blob, zlib.crc32(head))
    for c in chunks:
        file_crc = zlib.crc32(c, file_crc)
    with atomic_write(path) as f:
        f.write(head)
        f.write(struct.pack("<I", file_crc))
        f.write(blob)
        for c in chunks:
            f.write(c)
    size = path.stat().st_size
    log.info("wrote %s: %d bytes (%d payload + %d header)", path, size, payload_size, size - payload_size)
    return size


def _json_depth_ok(text: str, limit: int) -> bool:
    """Whether the bracket nesting of JSON ``text`` stays within ``limit`` (strings skipped), so
    ``json.loads`` never recurses deep enough to raise RecursionError."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _read(path: Path) -> tuple[dict, memoryview]:
    """Parse and validate the header; return (metadata incl. header_bytes, payload view).

    Every problem is a one-line ``ValueError`` naming ``path``."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read compressed checkpoint {path}: {e.strerror or e}") from None
    if len(data) < _FIXED_V1.size:
        raise ValueError(f"{path}: truncated: {len(data)} bytes, shorter than the {HEADER_FIXED_BYTES}-byte header")
    magic, version, n = _FIXED_V1.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a wavesweep compressed checkpoint (magic {magic!r}, expected {MAGIC!r})")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported format version {version}; supported: {', '.join(map(str, READABLE_VERSIONS))}")
    fixed = HEADER_FIXED_BYTES if version >= 2 else _FIXED_V1.size
    if len(data) < fixed:
        raise ValueError(f"{path}: truncated: {len(data)} bytes, shorter than the {fixed}-byte header")
    if n > len(data) - fixed:
        raise ValueError(f"{path}: truncated: metadata length {n} exceeds the file size {len(data)}")
    if n > MAX_METADATA_BYTES:
        raise ValueError(f"{path}: corrupt metadata: {n} bytes, above the limit of {MAX_METADATA_BYTES}")
    if version >= 2:
        (stored_crc,) = struct.unpack_from("<I", data, _CRC_AT)
        mv = memoryview(data)
        if zlib.crc32(mv[fixed:], zlib.crc32(mv[:_CRC_AT])) != stored_crc:
            raise ValueError(f"{path}: corrupt: file CRC-32 mismatch (header, metadata or payload damaged)")
    try:
        text = bytes(data[fixed : fixed + n]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: corrupt metadata: not UTF-8 at byte {e.start}") from None
    if not _json_depth_ok(text, MAX_JSON_DEPTH):
        raise ValueError(f"{path}: corrupt metadata: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise ValueError(f"{path}: corrupt metadata: {_one_line(e)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("entries"), list) or not _is_count(meta.get("payload_bytes")):
        raise ValueError(f"{path}: corrupt metadata: missing or invalid 'entries' or 'payload_bytes'")
    header_bytes = fixed + n
    payload = memoryview(data)[header_bytes:]
    if len(payload) != meta["payload_bytes"]:
        what = "truncated" if len(payload) < meta["payload_bytes"] else "trailing bytes"
        raise ValueError(f"{path}: {what}: payload is {len(payload)} bytes, header says {meta['payload_bytes']}")
    meta["header_bytes"] = header_bytes
    meta["file_version"] = version
    return meta, payload


def _one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_header(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint, plus ``header_bytes`` (file size - payload size)."""
    meta, _ = _read(Path(path))
    return meta


def _entry_dtype(path: Path, e: dict, field_name: str) -> tuple[torch.dtype, np.dtype | None]:
    name = e.get(field_name)
    if name not in _DTYPES:
        raise ValueError(f"{path}: entry {e.get('key')!r}: unknown dtype {name!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _take(path: Path, payload: memoryview, pos: int, nbytes: int, key: str) -> tuple[memoryview, int]:
    if nbytes < 0 or pos + nbytes > len(payload):
        raise ValueError(f"{path}: corrupt: entry {key!r} runs past the end of the payload")
    return payload[pos : pos + nbytes], pos + nbytes


def _to_tensor(buf: memoryview, tdt: torch.dtype, npdt: np.dtype | None, count: int) -> torch.Tensor:
    if npdt is not None:
        return torch.from_numpy(np.frombuffer(buf, dtype=npdt, count=count).copy())
    # dtypes numpy lacks (bfloat16): reinterpret the raw bytes
    if count == 0:  # an empty uint8 tensor cannot be viewed as a wider dtype
        return torch.empty(0, dtype=tdt)
    raw = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy())
    return raw.view(tdt)[:count]


def _shape(v: object) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 16 or not all(_is_count(i) for i in v):
        raise ValueError(f"bad shape {str(v)[:80]}")
    return tuple(v)


def read_compressed(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Decode a checkpoint into an ordinary state dict (CPU tensors) and its metadata.

    Any damage is a one-line ``ValueError`` naming ``path`` (never KeyError, TypeError,
    OverflowError, RecursionError, ...): sizes are checked against the payload before anything
    is allocated."""
    path = Path(path)
    meta, payload = _read(path)
    if zlib.crc32(payload) != meta.get("payload_crc32"):
        raise ValueError(f"{path}: corrupt: payload CRC-32 mismatch")
    sd: dict[str, torch.Tensor] = {}
    aliases: list[tuple[str, str, tuple[int, ...], torch.dtype]] = []
    pos = 0
    try:
        for e in meta["entries"]:
            if not isinstance(e, dict) or not isinstance(e.get("key"), str):
                raise ValueError(f"entry {str(e)[:80]} is not a mapping with a string key")
            key = e["key"]
            shape = _shape(e["shape"])
            tdt, npdt = _entry_dtype(path, e, "dtype")
            numel = math.prod(shape)
            kind = e["kind"]
            if kind == "alias":  # resolved below, once every stored entry is read
                if not isinstance(e["of"], str):
                    raise ValueError(f"entry {key!r}: alias of {str(e['of'])[:40]!r} is not a key")
                sd[key] = None  # type: ignore[assignment]  (state-dict order kept)
                aliases.append((key, e["of"], shape, tdt))
                continue
            if kind == "dense":
                buf, pos = _take(path, payload, pos, numel * _itemsize(tdt), key)
                sd[key] = _to_tensor(buf, tdt, npdt, numel).reshape(shape)
                continue
            if kind not in ("mask", "dwt"):
                raise ValueError(f"{path}: entry {key!r}: unknown kind {str(kind)[:40]!r}; valid: dense, mask, dwt, alias")
            n, kept = e["n"], e["kept"]
            if not (_is_count(n) and _is_count(kept)):
                raise ValueError(f"entry {key!r}: n and kept must be counts, got {str(n)[:20]}, {str(kept)[:20]}")
            buf, pos = _take(path, payload, pos, math.ceil(n / 8), key)
            keep = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=n).astype(bool)
            if int(np.count_nonzero(keep)) != kept:
                raise ValueError(f"{path}: corrupt: entry {key!r} bitmap has {int(keep.sum())} kept, header says {kept}")
            vdt, vnp = _entry_dtype(path, e, "value_dtype")
            buf, pos = _take(path, payload, pos, kept * _itemsize(vdt), key)
            values = _to_tensor(buf, vdt, vnp, kept)
            if kind == "mask":
                if n != numel:
                    raise ValueError(f"{path}: corrupt: entry {key!r} has {n} mask positions for {numel} weights")
                flat = torch.zeros(n, dtype=tdt)
                flat[torch.from_numpy(keep)] = values.to(tdt)
                sd[key] = flat.reshape(shape)
            else:
                st = wv.CoeffStructure.from_json(e["structure"])
                if st.n_coeffs != n or st.shape != shape:
                    raise ValueError(f"{path}: corrupt: entry {key!r} coefficient structure does not match n/shape")
                coeffs = np.zeros(n, dtype=values.numpy().dtype)
                coeffs[keep] = values.numpy()
                sd[key] = torch.from_numpy(wv.reconstruct(coeffs, st)).to(tdt).reshape(shape)
        for key, of, shape, tdt in aliases:
            t = sd.get(of)
            if t is None or tuple(t.shape) != shape or t.dtype != tdt:
                raise ValueError(f"{path}: corrupt: entry {key!r} is an alias of {of[:80]!r}, "
                                 "not a stored entry of its shape and dtype")  # fmt: skip
            sd[key] = t  # one tensor under both keys, as state_dict() gives it
    except ValueError as err:
        msg = _one_line(err)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: corrupt metadata entry: {msg}") from None
    except (KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError, RuntimeError, MemoryError) as err:
        raise ValueError(f"{path}: corrupt metadata entry: {type(err).__name__}: {_one_line(err)}") from None
    if pos != len(payload):
        raise ValueError(f"{path}: corrupt: {len(payload) - pos} unread payload bytes")
    return sd, dict(meta)


def load_compressed(path: str | os.PathLike, model: nn.Module) -> tuple[nn.Module, dict]:
    """Load a checkpoint into ``model`` (same architecture) in place; return ``(model, metadata)``.

    Keys and shapes must match ``model.state_dict()`` exactly, else ``ValueError`` naming the
    first offending key. Weights equal the pruned model's bitwise for magnitude/random and to
    float tolerance for dwt (the same inverse DWT runs on the same stored coefficients).
    """
    sd, meta = read_compressed(path)
    target = model.state_dict()
    for key in list(sd) + [k for k in target if k not in sd]:
        if key not in target:
            raise ValueError(f"{path}: key {key!r} is not in {type(model).__name__}'s state dict")
        if key not in sd:
            raise ValueError(f"{path}: {type(model).__name__} has key {key!r} that the checkpoint lacks")
        if tuple(sd[key].shape) != tuple(target[key].shape):
            raise ValueError(
                f"{path}: key {key!r}: checkpoint shape {tuple(sd[key].shape)} != model shape {tuple(target[key].shape)}"
            )
    model.load_state_dict(sd, strict=True)
    return model, meta
