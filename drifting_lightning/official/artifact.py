"""Read the authors' artifact folders: ``metadata.json`` + ``ema_params.msgpack`` (flax ``msgpack_serialize``).

flax writes a nested dict of arrays; each array is a msgpack ext of type 1 whose payload is the msgpack triple
``(shape, dtype name, C-order bytes)``; arrays over 1 GiB become ``{"__msgpack_chunked_array__": True, "shape": {...},
"chunks": {"0": flat, ...}}``. This reader walks the file itself so that it can skip whole subtrees (an encoder's
decoder) without reading them and read each kept array straight into its tensor: peak memory is the kept tensors.
bfloat16 leaves become float32.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np
import torch

METADATA_FILE = "metadata.json"
PARAMS_FILE = "ema_params.msgpack"
CHUNKED_MARKER = "__msgpack_chunked_array__"
NDARRAY_EXT, SCALAR_EXT = 1, 3
KeyPath = tuple[str, ...]


class ArtifactError(ValueError):
    """An artifact folder or file that is not what the authors' format says it is."""


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """``folder/metadata.json`` as a dict; a missing or damaged file is an error naming it."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist: an artifact folder holds metadata.json and ema_params.msgpack")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); re-download the artifact") from None
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{path} holds a {type(metadata).__name__}, expected a JSON object")
    return metadata


def read_params(path: str | Path, skip: Callable[[KeyPath], bool] | None = None) -> dict[str, torch.Tensor]:
    """Every array of a flax msgpack file as ``{"a/b/c": float tensor}``; subtrees where ``skip(path)`` is true
    are passed over unread."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist: an artifact folder holds metadata.json and ema_params.msgpack")
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=1 << 20) as f:
        reader = _Reader(f, path)
        try:
            if not reader.next_is_map():
                raise ArtifactError(f"{path}: the top level is not a map of parameters")
            reader.walk_map((), skip or (lambda _: False), out)
        except (struct.error, EOFError) as err:
            raise ArtifactError(f"{path} is truncated or not a flax msgpack file ({err})") from None
        if f.read(1):
            raise ArtifactError(f"{path} has bytes after its parameter tree: not a flax msgpack file")
    return out


def _bf16_to_float32(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.bfloat16).float()


class _Reader:
    """A msgpack subset reader positioned on a file: maps descend, arrays read in place, anything else decoded."""

    def __init__(self, f: BinaryIO, name: Path) -> None:
        self.f = f
        self.name = name

    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise EOFError(f"wanted {n} bytes, found {len(data)}")
        return data

    def _peek_byte(self) -> int:
        head = self.f.peek(1)[:1]  # type: ignore[attr-defined]
        if not head:
            raise EOFError("unexpected end of file")
        return head[0]

    def next_is_map(self) -> bool:
        b = self._peek_byte()
        return 0x80 <= b <= 0x8F or b in (0xDE, 0xDF)

    def _map_size(self) -> int:
        b = self._read(1)[0]
        if 0x80 <= b <= 0x8F:
            return b & 0x0F
        return struct.unpack(">H" if b == 0xDE else ">I", self._read(2 if b == 0xDE else 4))[0]

    def walk_map(self, prefix: KeyPath, skip: Callable[[KeyPath], bool], out: dict[str, torch.Tensor]) -> None:
        self._walk_entries(prefix, self._map_size(), None, skip, out)

    def _walk_entries(
        self,
        prefix: KeyPath,
        size: int,
        first_key: str | None,
        skip: Callable[[KeyPath], bool],
        out: dict[str, torch.Tensor],
    ) -> None:
        for i in range(size):
            key = first_key if i == 0 and first_key is not None else self._key()
            path = (*prefix, key)
            if skip(path):
                self._skip()
            elif self.next_is_map():
                sub_size = self._map_size()
                if sub_size == 0:
                    continue
                sub_first = self._key()
                # A chunked array is a map whose first key is the marker; any other map is a subtree.
                if sub_first == CHUNKED_MARKER:
                    out["/".join(path)] = self._chunked(sub_size)
                else:
                    self._walk_entries(path, sub_size, sub_first, skip, out)
            else:
                value = self._leaf()
                if value is not None:
                    out["/".join(path)] = value

    def _key(self) -> str:
        return str(self._value_bytes_decoded())

    def _chunked(self, size: int) -> torch.Tensor:
        fields: dict[str, Any] = {CHUNKED_MARKER: self._value_bytes_decoded()}
        for _ in range(size - 1):
            key = self._key()
            fields[key] = self._decode_tree()
        shape = tuple(int(fields["shape"][str(i)]) for i in range(len(fields["shape"])))
        chunks = [fields["chunks"][str(i)] for i in range(len(fields["chunks"]))]
        return torch.cat([c.reshape(-1) for c in chunks]).reshape(shape)

    def _decode_tree(self) -> Any:
        if self.next_is_map():
            return {self._key(): self._decode_tree() for _ in range(self._map_size())}
        b = self._peek_byte()
        if self._is_ext(b):
            return self._array()
        return self._value_bytes_decoded()

    def _leaf(self) -> torch.Tensor | None:
        b = self._peek_byte()
        if self._is_ext(b):
            return self._array()
        value = self._value_bytes_decoded()
        if isinstance(value, bool | int | float):
            return torch.tensor(float(value))
        return None  # strings and other metadata in the tree are not parameters

    @staticmethod
    def _is_ext(b: int) -> bool:
        return b in (0xC7, 0xC8, 0xC9) or 0xD4 <= b <= 0xD8

    def _ext_header(self) -> tuple[int, int]:
        b = self._read(1)[0]
        if 0xD4 <= b <= 0xD8:
            length = 1 << (b - 0xD4)
        else:
            fmt, n = {0xC7: (">B", 1), 0xC8: (">H", 2), 0xC9: (">I", 4)}[b]
            length = struct.unpack(fmt, self._read(n))[0]
        code = struct.unpack(">b", self._read(1))[0]
        return code, length

    def _array(self) -> torch.Tensor:
        code, length = self._ext_header()
        if code not in (NDARRAY_EXT, SCALAR_EXT):
            raise ArtifactError(f"{self.name}: msgpack ext type {code} is not a flax array")
        start = self.f.tell()
        # Payload: fixarray(3) [shape array, dtype str, bin buffer]; the buffer is read straight into the tensor.
        if self._read(1)[0] != 0x93:
            raise ArtifactError(f"{self.name}: an array payload is not (shape, dtype, bytes)")
        shape = tuple(int(s) for s in self._decode_small())
        dtype_name = self._decode_small()
        dtype_name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
        nbytes = self._bin_header()
        tensor = self._read_into(dtype_name, nbytes)
        if self.f.tell() - start != length:
            raise ArtifactError(f"{self.name}: an array's payload length does not match its header")
        return tensor.reshape(shape)

    def _read_into(self, dtype_name: str, nbytes: int) -> torch.Tensor:
        raw = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        got = 0
        while got < nbytes:
            n = self.f.readinto(view[got:])
            if not n:
                raise EOFError(f"wanted {nbytes} array bytes, found {got}")
            got += n
        if dtype_name == "bfloat16":
            return _bf16_to_float32(raw)
        try:
            np_dtype = np.dtype(dtype_name)
        except TypeError:
            raise ArtifactError(f"{self.name}: unknown array dtype {dtype_name!r}") from None
        if np_dtype.byteorder == ">":
            raise ArtifactError(f"{self.name}: big-endian arrays are not supported")
        tensor = torch.from_numpy(raw.numpy().view(np_dtype))
        return tensor.float() if tensor.is_floating_point() or tensor.dtype == torch.float16 else tensor

    def _bin_header(self) -> int:
        b = self._read(1)[0]
        fmt, n = {0xC4: (">B", 1), 0xC5: (">H", 2), 0xC6: (">I", 4)}.get(b, (None, 0))
        if fmt is None:
            raise ArtifactError(f"{self.name}: an array's bytes are not a msgpack bin")
        return struct.unpack(fmt, self._read(n))[0]

    def _decode_small(self) -> Any:
        """One small value (shape tuple, dtype name, key, scalar) decoded with msgpack."""
        return msgpack.unpackb(self._value_bytes(), raw=True, strict_map_key=False)

    def _value_bytes_decoded(self) -> Any:
        return msgpack.unpackb(self._value_bytes(), raw=False, strict_map_key=False)

    def _value_bytes(self) -> bytes:
        """The bytes of the next value (not a map, not an ext), consumed."""
        buf = io.BytesIO()
        self._copy_value(buf)
        return buf.getvalue()

    def _skip(self) -> None:
        self._copy_value(None)

    def _copy_value(self, sink: io.BytesIO | None) -> None:
        b = self._read(1)[0]
        if sink is not None:
            sink.write(bytes([b]))

        def take(n: int) -> bytes:
            if sink is None:
                self.f.seek(n, io.SEEK_CUR)
                return b""
            data = self._read(n)
            sink.write(data)
            return data

        def take_len(fmt: str, n: int) -> int:
            data = self._read(n)
            if sink is not None:
                sink.write(data)
            return struct.unpack(fmt, data)[0]

        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):  # fixint, nil, bool
            return
        if 0xA0 <= b <= 0xBF:  # fixstr
            take(b & 0x1F)
        elif 0x90 <= b <= 0x9F:  # fixarray
            for _ in range(b & 0x0F):
                self._copy_value(sink)
        elif 0x80 <= b <= 0x8F:  # fixmap
            for _ in range(2 * (b & 0x0F)):
                self._copy_value(sink)
        elif b in (0xCC, 0xD0):
            take(1)
        elif b in (0xCD, 0xD1):
            take(2)
        elif b in (0xCA, 0xCE, 0xD2):
            take(4)
        elif b in (0xCB, 0xCF, 0xD3):
            take(8)
        elif b in (0xC4, 0xD9):
            take(take_len(">B", 1))
        elif b in (0xC5, 0xDA):
            take(take_len(">H", 2))
        elif b in (0xC6, 0xDB):
            take(take_len(">I", 4))
        elif 0xD4 <= b <= 0xD8:  # fixext: type byte + 2^k bytes
            take(1 + (1 << (b - 0xD4)))
        elif b in (0xC7, 0xC8, 0xC9):
            n = take_len({0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}[b], {0xC7: 1, 0xC8: 2, 0xC9: 4}[b])
            take(1 + n)
        elif b in (0xDC, 0xDD):
            for _ in range(take_len(">H" if b == 0xDC else ">I", 2 if b == 0xDC else 4)):
                self._copy_value(sink)
        elif b in (0xDE, 0xDF):
            for _ in range(2 * take_len(">H" if b == 0xDE else ">I", 2 if b == 0xDE else 4)):
                self._copy_value(sink)
        else:
            raise ArtifactError(f"{self.name}: byte 0x{b:02x} is not valid msgpack")
