"""safetensors weights read without trusting them: headers first, tensors one at a time.

    weights = open_weights(folder)          # model.safetensors, or shards + their index
    weights.entries["wte.weight"].shape     # from the header: no tensor data read
    tensor = weights.read("wte.weight")     # one tensor (pread), checked finite as it is read

A model folder holds either one `model.safetensors` or shards `model-NNNNN.safetensors` named
by `model.safetensors.index.json` (Hugging Face's index format: {"metadata": {...},
"weight_map": {tensor name: shard file}}). A sharded model keeps each MoE expert's tensors
separately addressable, so offloaded inference reads one expert alone.

The header of every file is parsed and checked before a byte of tensor data is used: its length
against the file, every dtype known, every tensor's byte range equal to its shape times its
element size, the ranges contiguous and ending exactly at the end of the file (a truncated or
padded file is refused here, not as a short read later). Every shard an index names is a plain
file name inside the folder, a regular file and not a symlink.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CpmError
from ..folders import member

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}.safetensors"
SHARD_PATTERN = re.compile(r"model-\d{5}\.safetensors")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

#: safetensors dtype codes and their element sizes in bytes.
ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                 "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
                 "BOOL": 1}
#: the dtypes a cpmctl model holds: floating point that torch reads and checks for finiteness.
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F64": torch.float64}
TORCH_CODES = {dtype: code for code, dtype in FLOAT_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a header declares it: where its bytes are and what they mean."""

    name: str
    path: Path
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `path`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def check_float(self) -> torch.dtype:
        """The torch dtype of a tensor a model can hold; any other dtype is a CpmError."""
        if self.dtype not in FLOAT_DTYPES:
            raise CpmError(f"{self.path}: tensor {self.name} is {self.dtype}; model weights "
                           f"must be floating point ({', '.join(FLOAT_DTYPES)}), never "
                           f"cast from another type")
        return FLOAT_DTYPES[self.dtype]


def _bad(path: Path, why: str) -> CpmError:
    return CpmError(f"{path}: not a valid safetensors file ({why})")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors `path` declares, checked against the file's size (see the module doc)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            length = int.from_bytes(head, "little")
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise _bad(path, f"header length {length} exceeds the file ({size} bytes)"
                           if length <= MAX_HEADER_BYTES else
                           f"header length {length} exceeds {MAX_HEADER_BYTES} bytes")
            raw = f.read(length)
    except OSError as exc:
        raise CpmError(f"{path}: unreadable ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    data_start = 8 + length
    entries: dict[str, TensorEntry] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"tensor {name}: expected dtype, shape and data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in ELEMENT_BYTES:
            raise _bad(path, f"tensor {name}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _bad(path, f"tensor {name}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise _bad(path, f"tensor {name}: data_offsets {offsets!r}")
        nbytes = offsets[1] - offsets[0]
        if nbytes != math.prod(shape) * ELEMENT_BYTES[dtype]:
            raise _bad(path, f"tensor {name}: {nbytes} bytes for shape {shape} of {dtype}")
        ranges.append((offsets[0], offsets[1], name))
        entries[name] = TensorEntry(name, path, dtype, tuple(shape), data_start + offsets[0],
                                    nbytes)
    end = 0
    for start, stop, name in sorted(ranges):
        if start != end:
            raise _bad(path, f"tensor {name} starts at byte {start}, expected {end}")
        end = stop
    if data_start + end != size:
        cut = [name for start, stop, name in sorted(ranges) if data_start + stop > size]
        detail = (f" (truncated: tensor {cut[0]}" + (f" and {len(cut) - 1} after it" if
                                                     len(cut) > 1 else "") + " cut short)"
                  if cut else "")
        raise _bad(path, f"the header declares {data_start + end} bytes, the file has "
                         f"{size}{detail}")
    return entries


def check_inside(folder: Path, name: object, where: Path) -> Path:
    """`folder/name` for a plain file name `name` that an index names: relative, no '..', no
    separator, a regular file that is not a symlink (so nothing outside the folder is read)."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name \
            or "/" in name or "\\" in name:
        raise CpmError(f"{where}: shard {name!r} is not a plain file name inside {folder}")
    path = member(folder, name, str(where))
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise CpmError(f"{where}: shard {name} is missing") from None
    except OSError as exc:
        raise CpmError(f"{where}: shard {name}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(mode):
        raise CpmError(f"{where}: shard {name} is a symlink; shards must be files inside "
                       f"{folder}")
    if not stat.S_ISREG(mode):
        raise CpmError(f"{where}: shard {name} is not a regular file")
    return path


def _read_index(folder: Path) -> tuple[dict[str, str], dict[str, int]]:
    """(weight map, crc32 of each tensor's bytes where the index records them: cpmctl's
    shards do, in metadata.crc32, so a corrupted expert is caught when it is read)."""
    where = folder / INDEX
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CpmError(f"{where}: not a shard index ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                   for v in weight_map.values()):
        raise CpmError(f"{where}: not a shard index (expected a JSON object with a "
                       f"'weight_map' of tensor name -> shard file)")
    metadata = data.get("metadata", {})
    crcs = metadata.get("crc32", {}) if isinstance(metadata, dict) else None
    if not isinstance(crcs, dict) or not all(type(v) is int and k in weight_map
                                             for k, v in crcs.items()):
        raise CpmError(f"{where}: metadata.crc32 must map tensor names of the weight_map "
                       f"to integers")
    return weight_map, crcs


class Weights:
    """The tensors of one model folder, by name; files are opened once and read with pread,
    which releases the GIL (a loader thread reads while the main thread computes)."""

    def __init__(self, entries: dict[str, TensorEntry], where: Path,
                 crc32: dict[str, int] | None = None):
        self.entries = entries
        self.where = where  # the file or index that names them all, for errors
        self.crc32 = crc32 or {}
        self._fds: dict[Path, int] = {}

    @property
    def total_numel(self) -> int:
        return sum(e.numel for e in self.entries.values())

    @property
    def files(self) -> list[Path]:
        return sorted({e.path for e in self.entries.values()})

    def read(self, name: str, *, what: str | None = None) -> torch.Tensor:
        """Tensor `name` in its stored (floating) dtype, refused if any value is NaN or
        infinite. `what` names it in errors (e.g. "layer 3 expert 7")."""
        entry = self.entries[name]
        dtype = entry.check_float()
        data = torch.empty(entry.nbytes, dtype=torch.uint8)
        view = memoryview(data.numpy())
        fd = self._fd(entry.path)
        done = 0
        while done < entry.nbytes:
            try:
                n = os.preadv(fd, [view[done:]], entry.offset + done)
            except OSError as exc:
                raise CpmError(f"{entry.path}: reading {entry.name}: {exc.strerror}") from None
            if n == 0:
                raise CpmError(f"{entry.path}: tensor {entry.name} is cut short "
                               f"({done} of {entry.nbytes} bytes; the file shrank)")
            done += n
        label = f" ({what})" if what else ""
        expected_crc = self.crc32.get(name)
        if expected_crc is not None and zlib.crc32(view) != expected_crc:
            raise CpmError(f"{entry.path}: tensor {entry.name}{label} is corrupted (its crc32 "
                           f"differs from the one {INDEX} recorded)")
        tensor = data.view(dtype).reshape(entry.shape)
        if not bool(torch.isfinite(tensor).all()):
            raise CpmError(f"{entry.path}: tensor {entry.name}{label} holds NaN or infinite "
                           f"values")
        return tensor

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise CpmError(f"{path}: unreadable ({exc.strerror})") from None
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Weights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / INDEX).is_file()


def open_weights(folder: str | Path) -> Weights:
    """The weights of `folder`: `model.safetensors`, or the shards its index names (each
    shard's header must hold exactly the tensors the index gives it)."""
    folder = Path(folder)
    single, index = folder / WEIGHTS, folder / INDEX
    if single.is_file() and index.is_file():
        raise CpmError(f"{folder}: holds both {WEIGHTS} and {INDEX}; remove one")
    if single.is_file():
        return Weights(read_header(single), single)
    if not index.is_file():
        raise CpmError(f"{folder}: {WEIGHTS} is missing")
    weight_map, crcs = _read_index(folder)
    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    entries: dict[str, TensorEntry] = {}
    for shard, names in sorted(by_shard.items()):
        path = check_inside(folder, shard, index)
        header = read_header(path)
        if set(header) != names:
            missing, extra = names - set(header), set(header) - names
            detail = (f"lacks {sorted(missing)[0]}" if missing
                      else f"holds {sorted(extra)[0]}, which the index does not give it")
            raise CpmError(f"{index}: shard {shard} does not match the index ({detail})")
        entries.update(header)
    return Weights(entries, index, crcs)


# ---------------------------------------------------------------- writing, tensor by tensor


def write_header(f, tensors: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
    """Write the safetensors header for (name, dtype code, shape) in this order; the caller
    then writes each tensor's bytes in the same order (`write_tensor`), so a shard is written
    one tensor at a time and never held whole."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * ELEMENT_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)


def write_tensor(f, tensor: torch.Tensor) -> None:
    """A tensor's bytes in safetensors' layout (contiguous, little-endian)."""
    f.write(memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
                       .numpy()))


def tensor_crc32(tensor: torch.Tensor) -> int:
    """crc32 of the bytes `write_tensor` writes for `tensor`."""
    return zlib.crc32(memoryview(tensor.detach().contiguous().cpu().reshape(-1)
                                 .view(torch.uint8).numpy()))


def write_index(folder: Path, weight_map: dict[str, str], crc32: dict[str, int],
                total_bytes: int) -> None:
    """`model.safetensors.index.json`: Hugging Face's layout, plus each tensor's crc32."""
    (folder / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total_bytes, "crc32": crc32}, "weight_map": weight_map},
        indent=1) + "\n", encoding="utf-8")
