"""Safetensors written tensor by tensor, and read tensor by tensor; the checked readers of a
checkpoint's files (which file holds each tensor, a corrupt file or a non-finite tensor as one
UserError naming it).

`write_safetensors` takes entries whose name, shape and dtype are known up front (the header comes
first in the file) and whose data is produced only when its turn comes, so a checkpoint of any
size is written with one tensor (or one chunk of one) in memory. `write_sharded` splits entries
into shards with an index, as transformers does. `LazyTensors` is the reading side: a mapping
from names to tensors that reads each from its (memory-mapped) file when it is asked for.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError, read_json, writing

ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size ("5GB")
# safetensors' own writer orders tensors by dtype (this rank, descending), then by name; so do we,
# and the header is its compact JSON: a file we stream is byte for byte the one save_file writes
RANK = {
    torch.bool: 0,
    torch.uint8: 4,
    torch.int8: 5,
    torch.float16: 11,
    torch.bfloat16: 12,
    torch.int32: 13,
    torch.float32: 15,
    torch.float64: 16,
    torch.int64: 17,
}


@dataclass
class Entry:
    """One tensor to write: its data comes from produce(), a tensor or an iterable of row chunks."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor | Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def entry_of(name: str, t: torch.Tensor) -> Entry:
    """An entry for a tensor already in memory."""
    return Entry(name, tuple(t.shape), t.dtype, lambda: t)


def write_safetensors(path: Path, entries: list[Entry], metadata: dict | None = None) -> int:
    """Write entries in safetensors' order (dtype, then name); returns the file's size. Each produced
    tensor must have the entry's dtype and, together, its bytes (a RuntimeError otherwise: the
    header would lie)."""
    entries = sorted(entries, key=lambda e: (-RANK[e.dtype], e.name))
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for e in entries:
        if e.dtype not in RANK:
            raise ValueError(f"{e.name}: dtype {e.dtype} has no safetensors code")
        header[e.name] = {
            "dtype": ST_DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with writing(path), open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            done = 0
            for chunk in _chunks(e.produce()):
                if chunk.dtype != e.dtype:
                    raise RuntimeError(f"{e.name}: produced {chunk.dtype}, header says {e.dtype}")
                data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                done += data.nbytes
            chunk = data = None  # before the next tensor is made
            if done != e.nbytes:
                raise RuntimeError(f"{e.name}: produced {done} bytes, header says {e.nbytes}")
    return 8 + len(raw) + offset


def _chunks(x) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    else:
        yield from x


def write_sharded(
    out_dir: Path, entries: list[Entry], max_bytes: int = SHARD_BYTES, metadata: dict | None = None
) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when
    the entries exceed max_bytes (a tensor larger than that gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    out_dir = Path(out_dir)
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0], metadata)
        return [out_dir / "model.safetensors"]
    paths, wmap = [], {}
    for i, shard in enumerate(shards, 1):
        p = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(p, shard, metadata)
        paths.append(p)
        wmap.update({e.name: p.name for e in shard})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": wmap}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


class LazyTensors(Mapping):
    """name -> tensor, read from its safetensors file on access (nothing is kept: a second access
    reads again). Reads are plain file reads into a fresh buffer, not memory maps: a tensor's
    memory is its own and goes with it, and pages of the file never count against the process.
    `check(name, tensor, path)` runs on every read (finiteness). Tensors set with `[]=` live in memory
    and shadow the files; `info(name)` is (shape, dtype) without reading."""

    def __init__(
        self,
        files: dict[str, Path],
        check: Callable | None = None,
        aliases: dict[str, str] | None = None,
        order: list[str] | None = None,
    ):
        """files: name -> its file; aliases: name -> the name the file stores it under (a plain
        checkpoint's tensors go by Ruyi's names); order: the order names iterate in (a name set
        later and not in it comes after; one replaced keeps its place)."""
        self._files = dict(files)
        self._mem: dict[str, torch.Tensor] = {}
        self._order = dict.fromkeys(order or self._files)
        self._check = check
        self._where: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        aliases = aliases or {}
        stored = {aliases.get(n, n): n for n in self._files}
        for path in sorted(set(self._files.values())):
            for name, where in _header(path).items():
                if name in stored and self._files[stored[name]] == path:
                    self._where[stored[name]] = where
        absent = next((n for n in self._files if n not in self._where), None)
        if absent is not None:
            raise UserError(
                f"{self._files[absent]}: the index lists {aliases.get(absent, absent)} "
                "in this file, but it is not there"
            )

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._mem:
            return self._mem[name]
        if name not in self._files:
            raise KeyError(name)
        return self.loader(name)()

    def __setitem__(self, name: str, t: torch.Tensor) -> None:
        self._mem[name] = t
        self._files.pop(name, None)
        self._order.setdefault(name)

    def pop(self, name: str, *default):
        if name in self._mem:
            return self._mem.pop(name)
        if name in self._files:
            t = self[name]
            del self._files[name]
            return t
        if default:
            return default[0]
        raise KeyError(name)

    def loader(self, name: str) -> Callable[[], torch.Tensor]:
        """A function that reads this tensor (checked) when called, even after discard(name)."""
        if name in self._mem:
            t = self._mem[name]
            return lambda: t
        path, check, where = self._files[name], self._check, self._where[name]

        def load():
            t = _read(path, *where)
            if check is not None:
                check(name, t, path)
            return t

        return load

    def file(self, name: str) -> Path | None:
        """The file a tensor is read from (None: it is in memory)."""
        return self._files.get(name)

    def copy(self) -> "LazyTensors":
        """Another view of the same files (and the same in-memory tensors), set and discarded
        independently of this one."""
        new = LazyTensors.__new__(LazyTensors)
        new._files, new._mem, new._check, new._where = (
            dict(self._files),
            dict(self._mem),
            self._check,
            self._where,
        )
        new._order = dict(self._order)
        return new

    def discard(self, name: str) -> None:
        """Forget a tensor without reading it."""
        self._mem.pop(name, None)
        self._files.pop(name, None)

    def __iter__(self):
        return (n for n in self._order if n in self._files or n in self._mem)

    def __len__(self) -> int:
        return len(self._files) + len(self._mem)

    def __contains__(self, name) -> bool:
        return name in self._files or name in self._mem

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name in self._mem:
            return tuple(self._mem[name].shape), self._mem[name].dtype
        dtype, shape, _, _ = self._where[name]
        return shape, dtype


def _header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, first byte, end byte) of a safetensors file's tensors, after
    safetensors itself has validated the file (a corrupt one is a UserError naming it)."""
    with open_safetensors(path) as f:
        f.keys()
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    odd = next((k for k, v in header.items() if v["dtype"] not in TORCH_DTYPES), None)
    if odd is not None:
        raise UserError(
            f"{path}: tensor {odd} is {header[odd]['dtype']}, a dtype ruyi-quant does "
            f"not read ({', '.join(TORCH_DTYPES)})"
        )
    return {
        k: (
            TORCH_DTYPES[v["dtype"]],
            tuple(v["shape"]),
            8 + n + v["data_offsets"][0],
            8 + n + v["data_offsets"][1],
        )
        for k, v in header.items()
    }


def _read(path: Path, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int) -> torch.Tensor:
    buf = bytearray(end - start)
    with open(path, "rb") as fh:
        fh.seek(start)
        got = fh.readinto(buf)
    if got != end - start:
        raise UserError(f"{path}: truncated (a tensor ends at byte {end}, the file before it)")
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


# --- checked readers ----------------------------------------------------------------------
def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors or a sharded index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        wmap = read_json(index, "safetensors index")
        wmap = wmap.get("weight_map") if isinstance(wmap, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(f, str) for f in wmap.values()):
            raise UserError(f"{index}: not a safetensors index (needs a 'weight_map' object)")
        files = {name: model_dir / f for name, f in wmap.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise UserError(f"{index}: shard {f.name} is listed but missing")
        return files
    if single.is_file():
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise UserError(
            f"{model_dir}: only pickle weights (.bin/.pt) found; ruyi-quant never loads "
            "pickles: convert them to safetensors first"
        )
    raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


@contextlib.contextmanager
def open_safetensors(path: Path):
    """safe_open, with a corrupt or unreadable file as one UserError naming it."""
    try:
        with safe_open(path, "pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise UserError(f"{path}: not a readable safetensors file ({reason})") from None


def read_tensors(files: dict[str, Path], wanted: list[str] | None = None):
    """Yield (name, tensor) for the wanted names (all by default), one file open at a time."""
    by_file: dict[Path, list[str]] = {}
    for name in wanted if wanted is not None else files:
        by_file.setdefault(files[name], []).append(name)
    for path, tensor_names in by_file.items():
        with open_safetensors(path) as f:
            present = set(f.keys())
            for name in tensor_names:
                if name not in present:
                    raise UserError(f"{path}: the index lists {name} in this file, but it is not there")
                t = f.get_tensor(name)
                yield name, t


def check_finite(name: str, t: torch.Tensor, path: Path | None = None) -> None:
    """A float tensor must hold finite numbers (and be float: an integer weight is corrupt too);
    `path`: the file it was read from, named in the error."""
    where = f"{path}: " if path is not None else ""
    if not t.is_floating_point():
        raise UserError(
            f"{where}tensor {name} is {str(t.dtype).removeprefix('torch.')}, not a "
            "floating-point weight; the checkpoint is corrupt"
        )
    for block in t.reshape(-1).split(1 << 24):  # blocks: isfinite of a bf16 head makes float32
        if not torch.isfinite(block).all():  # and bool copies of it (3 GB for Ruyi's)
            bad = "NaN" if torch.isnan(block).any() else "Inf"
            raise UserError(f"{where}tensor {name} contains {bad} values; the checkpoint is corrupt")
