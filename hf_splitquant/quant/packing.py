"""Bit packing of integer codes, and base-3 packing of SplitQuant cluster ids.

Bit order (part of the storage format): each row is packed on its own and padded to whole bytes.
Inside a row, code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of a little-endian bit stream:
bit 0 of the stream is the least significant bit of byte 0. For 4-bit codes this puts element
``2j`` in the low nibble and ``2j+1`` in the high nibble of byte ``j`` (the order torch's int4
CPU kernels expect after conversion); for 2-bit codes element ``4j+k`` sits at bits ``2k..2k+1``
of byte ``j``; 3-bit codes straddle byte boundaries.

Cluster ids (0, 1, 2) are packed five to a byte as a base-3 number, digit ``k`` of byte ``j`` being
element ``5j+k`` (``byte = sum(id[5j+k] * 3**k)``), i.e. 1.6 bits per id.
"""

from __future__ import annotations

import math

import torch

__all__ = ["packed_row_bytes", "pack_codes", "unpack_codes", "trit_row_bytes", "pack_trits", "unpack_trits"]

_TRIT_POWERS = (1, 3, 9, 27, 81)


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes that one row of ``n`` codes of ``bits`` bits occupies."""
    return math.ceil(n * bits / 8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[rows, n]`` integer codes in ``[0, 2**bits)`` into ``[rows, packed_row_bytes(n, bits)]`` uint8."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    nbytes = packed_row_bytes(n, bits)
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    if 8 % bits == 0:
        # Whole codes per byte: shift and OR without expanding to single bits.
        per = 8 // bits
        pad = nbytes * per - n
        if pad:
            c = torch.cat([c, c.new_zeros(rows, pad)], dim=1)
        c = c.reshape(rows, nbytes, per)
        packed = c[..., 0].clone()  # uint8 throughout: no wide temporaries
        for k in range(1, per):
            packed |= c[..., k] << (k * bits)
        return packed
    # General widths: expand to a bit stream, then regroup by bytes.
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=c.device)
    stream = ((c.unsqueeze(-1) >> bit_idx) & 1).reshape(rows, n * bits)
    pad = nbytes * 8 - n * bits
    if pad:
        stream = torch.cat([stream, stream.new_zeros(rows, pad)], dim=1)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=c.device))
    return (stream.reshape(rows, nbytes, 8).to(torch.int32) * weights).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[rows, nbytes]`` uint8 -> ``[rows, n]`` uint8 codes."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"expected 2-D packed codes, got shape {tuple(packed.shape)}")
    rows, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise ValueError(
            f"packed rows hold {nbytes} bytes but {n} codes of {bits} bits need {packed_row_bytes(n, bits)}"
        )
    p = packed.to(torch.uint8)
    if bits == 8:
        return p.contiguous()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        if torch.compiler.is_compiling():  # dynamo cannot trace `out=` into a strided view; the fused
            parts = [torch.bitwise_and(p >> (k * bits), mask) for k in range(per)]  # kernel needs no buffer
            return torch.stack(parts, dim=-1).reshape(rows, nbytes * per)[:, :n].contiguous()
        out = torch.empty(rows, nbytes, per, dtype=torch.uint8, device=p.device)
        for k in range(per):
            torch.bitwise_and(p >> (k * bits), mask, out=out[..., k])
        return out.reshape(rows, nbytes * per)[:, :n].contiguous()
    # Other widths: ``bits`` bytes hold exactly 8 codes. Read each such chunk as one little-endian
    # integer and shift the 8 codes out of it (no per-bit expansion).
    chunks = math.ceil(nbytes / bits)
    if chunks * bits != nbytes:
        p = torch.cat([p, p.new_zeros(rows, chunks * bits - nbytes)], dim=1)
    # one little-endian word per chunk: int32 holds 3 bytes (3-bit codes), wider codes need int64
    byte_chunks = p.reshape(rows, chunks, bits).to(torch.int32 if bits <= 3 else torch.int64)
    word = byte_chunks[..., 0].clone()
    for k in range(1, bits):
        word |= byte_chunks[..., k] << (8 * k)
    if torch.compiler.is_compiling():  # as above: eight strided stores compile into a very slow kernel
        shifts = torch.arange(0, 8 * bits, bits, dtype=word.dtype, device=word.device)
        codes = torch.bitwise_and(word.unsqueeze(-1) >> shifts, mask).to(torch.uint8)
        return codes.reshape(rows, chunks * 8)[:, :n].contiguous()
    out = torch.empty(rows, chunks, 8, dtype=torch.uint8, device=p.device)
    for k in range(8):
        out[..., k] = (word >> (k * bits)) & mask
    return out.reshape(rows, chunks * 8)[:, :n].contiguous()


def trit_row_bytes(n: int) -> int:
    """Bytes that one row of ``n`` base-3 digits occupies (five per byte)."""
    return math.ceil(n / 5)


def pack_trits(ids: torch.Tensor) -> torch.Tensor:
    """Pack ``[rows, n]`` values in {0, 1, 2} into ``[rows, ceil(n / 5)]`` uint8."""
    if ids.dim() != 2:
        raise ValueError(f"expected 2-D cluster ids, got shape {tuple(ids.shape)}")
    rows, n = ids.shape
    nbytes = trit_row_bytes(n)
    t = ids.to(torch.int32)
    pad = nbytes * 5 - n
    if pad:
        t = torch.cat([t, t.new_zeros(rows, pad)], dim=1)
    powers = torch.tensor(_TRIT_POWERS, dtype=torch.int32, device=t.device)
    return (t.reshape(rows, nbytes, 5) * powers).sum(dim=-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`."""
    rows, nbytes = packed.shape
    if nbytes != trit_row_bytes(n):
        raise ValueError(f"packed cluster ids hold {nbytes} bytes per row but {n} ids need {trit_row_bytes(n)}")
    # one lookup per byte (a 256 x 5 table) instead of five integer divisions per digit; index_select on
    # int32 indices is several times faster on CPU than advanced indexing with int64 ones
    digits = _trit_table(packed.device).index_select(0, packed.to(torch.uint8).reshape(-1).to(torch.int32))
    return digits.reshape(rows, nbytes * 5)[:, :n].contiguous()


_TRIT_TABLES: dict[torch.device, torch.Tensor] = {}


def _trit_table(device: torch.device) -> torch.Tensor:
    """``[256, 5]`` uint8: the base-3 digits of every byte value (``byte // 3**k % 3``)."""
    table = _TRIT_TABLES.get(device)
    if table is None:
        values = torch.arange(256, dtype=torch.int32).unsqueeze(-1)
        powers = torch.tensor(_TRIT_POWERS, dtype=torch.int32)
        table = _TRIT_TABLES[device] = ((values // powers) % 3).to(torch.uint8).to(device)
    return table
