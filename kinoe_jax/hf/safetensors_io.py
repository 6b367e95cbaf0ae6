"""Streaming safetensors: plan the shards first, then write one tensor at a time.

The format is a little-endian u64 header length, a JSON header ({name: {dtype, shape,
data_offsets}}), then the raw bytes. Because the exporter knows every tensor's shape before it
reads any weight, the header of each shard is written up front and the data follows tensor by
tensor: memory holds one tensor, never a shard or the model. Reading is the mirror image: a
tensor is read from its offset and nothing else is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np

from kinoe_jax.hf.mapping import ConversionError

# safetensors dtype names <-> numpy (bfloat16 through ml_dtypes, which JAX already ships).
NP_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
             "BF16": np.dtype(ml_dtypes.bfloat16)}
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * NP_DTYPES[self.dtype].itemsize


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy, order-preserving split into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header_bytes(tensors: list[PlannedTensor]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one planned shard; tensors must arrive in plan order with the planned shape/dtype."""

    def __init__(self, path: str, tensors: list[PlannedTensor]):
        self.path, self.tensors, self._next = path, tensors, 0
        self._file = open(path, "wb")
        self._file.write(_header_bytes(tensors))

    def write(self, name: str, array: np.ndarray) -> None:
        planned = self.tensors[self._next]
        if name != planned.name or tuple(array.shape) != planned.shape or array.dtype != NP_DTYPES[planned.dtype]:
            raise ConversionError(f"{self.path}: expected {planned.name} {planned.shape} {planned.dtype}, "
                                  f"got {name} {tuple(array.shape)} {array.dtype}")
        # Raw little-endian bytes; the uint8 view also works for bfloat16, which has no buffer format.
        data = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
        self._file.write(data.reshape(-1).view(np.uint8))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.tensors):
            raise ConversionError(f"{self.path}: {len(self.tensors) - self._next} planned tensors never written")
        self._file.close()


def write_index(directory: str, shards: list[list[PlannedTensor]]) -> None:
    total = sum(t.nbytes for shard in shards for t in shard)
    weight_map = {t.name: shard_name(i, len(shards)) for i, shard in enumerate(shards) for t in shard}
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsReader:
    """The tensors of a HF directory (sharded with an index, or a single model.safetensors; a PEFT
    adapter directory names its single file adapter_model.safetensors)."""

    def __init__(self, directory: str, single_file: str = SINGLE_FILE):
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({e})") from e
        elif os.path.exists(os.path.join(directory, single_file)):
            files = [single_file]
        else:
            found = sorted(os.listdir(directory))
            raise ConversionError(f"{directory}: no {INDEX_FILE} or {single_file} (found {found}); "
                                  "only safetensors weights are read (convert .bin files with transformers first)")
        self.tensors: dict[str, StoredTensor] = {}
        for name in files:
            self._read_header(os.path.join(directory, name))

    def _read_header(self, path: str) -> None:
        if not os.path.exists(path):
            raise ConversionError(f"{path}: listed in the index but missing")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ConversionError(f"{path}: header length {n} exceeds the file size {size}: truncated or corrupted")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConversionError(f"{path}: header is not valid JSON ({e}): corrupted") from e
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in NP_DTYPES:
                raise ConversionError(f"{path}: tensor {name} has dtype {info['dtype']}; only "
                                      f"{sorted(NP_DTYPES)} are supported (quantized checkpoints are not)")
            begin, end = info["data_offsets"]
            if 8 + n + end > size:
                raise ConversionError(f"{path}: tensor {name} ends at byte {8 + n + end} but the file has {size}: truncated")
            self.tensors[name] = StoredTensor(path, info["dtype"], tuple(info["shape"]), 8 + n + begin, end - begin)

    def read(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        dtype = NP_DTYPES[t.dtype].newbyteorder("<")
        with open(t.file, "rb") as f:
            f.seek(t.start)
            data = f.read(t.nbytes)
        if len(data) != t.nbytes:
            raise ConversionError(f"{t.file}: tensor {name} is truncated")
        return np.frombuffer(data, dtype=dtype).reshape(t.shape)
