"""Paged attention over the layer-major KV pool (``kv_layout.KVLayout``), in pure PyTorch.

Lifecycle of one step:

1. :func:`build_attention_metadata` (or :func:`metadata_from_packed` on an already packed
   :class:`~pdserve.engine.batch.PackedBatch`) turns the step's chunks into a few tensors once:
   the position and KV slot of every new token (``slot = block_table[pos // bs] * bs + pos % bs``,
   computed with numpy on the host), the decode group (chunks of one token, batched together) and
   the prefill chunks (several tokens each).
2. Per layer, :func:`write_kv` stores the new tokens' K (post-RoPE) and V into their slots with
   one ``index_copy_`` (K and V of a token are adjacent in the fused QKV output).
3. Per layer, :func:`paged_attention` computes causal attention of every new query over its
   sequence's whole context (cached prefix + new tokens):

   * decode group: one padded gather of the sequences' K and V pages together
     (``[2, S, blocks*bs, Hkv, D]``) and one masked SDPA call, with the query heads folded onto
     their KV head (``[S, Hkv, G, D]``) so grouped-query attention never materialises repeated K/V;
   * a prefill chunk with no cached prefix attends to its own fresh K/V with ``is_causal``;
   * a prefill chunk after a cached prefix gathers its pages and uses an offset causal mask
     (query ``i`` sees keys ``j <= start_pos + i``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pdserve.engine.batch import PackedBatch, SeqChunk, pack_chunks

# Decode attention as two flat batched GEMMs (``_decode_flat``) from this many sequences on, for
# models with at most this many KV heads (measured on CPU: ~15% faster than SDPA at 32 sequences,
# slower below ~16).
DECODE_FLAT_MIN_SEQS = 24
DECODE_FLAT_MAX_KV_HEADS = 2


@dataclass
class PrefillSpan:
    token_start: int  # offset of the chunk's first token in the flat batch
    num_tokens: int
    start_pos: int  # tokens of this sequence already cached before the chunk
    block_ids: torch.Tensor | None  # [ceil(end_pos / bs)] when start_pos > 0, else None
    mask: torch.Tensor | None  # bool [n, end_pos] when start_pos > 0, else None


@dataclass
class DecodeGroup:
    token_idx: torch.Tensor  # int64 [Sd] rows of the one-token chunks in the flat batch
    block_ids: torch.Tensor  # int64 [Sd * max blocks] flat (padded with block 0, masked out)
    mask: torch.Tensor  # additive [Sd, 1, 1, max blocks * bs]: 0 where key position < context
    # length, -inf elsewhere (model dtype; SDPA adds it as is, no per-layer bool conversion)
    is_whole_batch: bool  # every token of the batch is in the group, in order


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # int64 [T]
    slots: torch.Tensor  # int64 [T]
    decode: DecodeGroup | None
    prefills: list[PrefillSpan]
    max_position: int  # one past the largest position in the step (sizes the RoPE table)


class LayerKV:
    """One layer's pages ``[2, blocks, bs, Hkv, D]`` plus the two views every step uses, built
    once per KV pool: ``by_block [2, blocks, bs * Hkv * D]`` (page gathers) and ``by_slot
    [blocks * bs, 2, Hkv, D]`` (a strided view: K and V of one slot, for the KV write)."""

    __slots__ = ("by_block", "by_slot", "head_mask", "pages")

    def __init__(self, pages: torch.Tensor) -> None:
        _, num_blocks, block_size, kv_heads, head_dim = pages.shape
        self.pages = pages
        self.by_block = pages.view(2, num_blocks, block_size * kv_heads * head_dim)
        self.by_slot = pages.view(2, num_blocks * block_size, kv_heads, head_dim).transpose(0, 1)
        # [1, Hkv, 1, Hkv, 1] identity: spreads each query over its own KV head's slot of a
        # token's concatenated heads (see _decode_flat)
        eye = torch.eye(kv_heads, dtype=pages.dtype, device=pages.device)
        self.head_mask = eye.view(1, kv_heads, 1, kv_heads, 1)


def build_attention_metadata(
    chunks: list[SeqChunk], block_size: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> AttentionMetadata:
    """Flatten a step's chunks (structure checked, limits not) into the tensors every layer reuses."""
    return metadata_from_packed(pack_chunks(chunks, block_size), device, dtype)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor if device.type == "cpu" else tensor.to(device)


def metadata_from_packed(
    batch: PackedBatch, device: torch.device, dtype: torch.dtype = torch.float32
) -> AttentionMetadata:
    """The per-step attention tensors of an already packed batch (host index math in numpy);
    ``dtype``: the model's (the decode mask is additive in it)."""
    bs = batch.block_size
    lens = batch.query_lens
    decode = None
    if batch.pure_decode:
        dec = rows = batch.token_offsets
        ids, ends, whole = batch.block_tables, batch.end_pos, True
    else:
        dec = np.flatnonzero(lens == 1)  # chunk indices
        width = int(batch.table_lens[dec].max()) if dec.size else 0
        rows, ids, ends, whole = (
            batch.token_offsets[dec],
            batch.block_tables[dec, :width],
            batch.end_pos[dec],
            False,
        )
    if dec.size:
        keys = np.arange(ids.shape[1] * bs)
        mask = np.where(keys[None, :] < ends[:, None], np.float32(0), np.float32(-np.inf))
        mask_t = _to_device(mask[:, None, None, :], device)
        decode = DecodeGroup(
            token_idx=_to_device(rows, device),
            block_ids=_to_device(ids.reshape(-1), device),
            mask=mask_t if dtype == torch.float32 else mask_t.to(dtype),
            is_whole_batch=whole,
        )
    prefills: list[PrefillSpan] = []
    for i in [] if batch.pure_decode else np.flatnonzero(lens > 1).tolist():
        token_start, n, start = int(batch.token_offsets[i]), int(lens[i]), int(batch.start_pos[i])
        if start == 0:
            prefills.append(PrefillSpan(token_start, n, 0, None, None))
            continue
        end = start + n
        causal = np.arange(end)[None, :] <= np.arange(start, end)[:, None]
        ids_i = np.ascontiguousarray(batch.block_tables[i, : int(batch.table_lens[i])])
        prefills.append(
            PrefillSpan(token_start, n, start, _to_device(ids_i, device), _to_device(causal, device))
        )
    return AttentionMetadata(
        positions=_to_device(batch.positions, device),
        slots=_to_device(batch.slots, device),
        decode=decode,
        prefills=prefills,
        max_position=int(batch.end_pos.max()),
    )


def write_kv(layer: LayerKV, kv: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the new tokens' ``kv [T, 2, Hkv, D]`` (K then V) into their slots with a single
    ``index_copy_``."""
    layer.by_slot.index_copy_(0, slots, kv if kv.dtype == layer.pages.dtype else kv.to(layer.pages.dtype))


def _gather_pages(layer: LayerKV, block_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """K and V pages of ``block_ids [num_seqs * nb]`` (flat) in one ``index_select``:
    ``[2, num_seqs, nb*bs, Hkv, D]`` (cheaper on CPU than advanced indexing)."""
    _, _, _, kv_heads, head_dim = layer.pages.shape
    return layer.by_block.index_select(1, block_ids).view(2, num_seqs, -1, kv_heads, head_dim)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: LayerKV,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention output ``[T, Hq * D]`` for queries ``q [T, Hq, D]``; ``k, v [T, Hkv, D]`` are the
    new tokens' keys/values (already written into the layer's pages)."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = num_heads // kv_heads
    dec = meta.decode
    if dec is not None and dec.is_whole_batch:
        return _decode(q, layer, dec, scale, groups).reshape(num_tokens, num_heads * head_dim)
    out = q.new_empty(num_tokens, num_heads * head_dim)
    if dec is not None:
        res = _decode(q.index_select(0, dec.token_idx), layer, dec, scale, groups)
        out.index_copy_(0, dec.token_idx, res.reshape(-1, num_heads * head_dim))
    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        if span.block_ids is None or span.mask is None:
            res = _grouped_sdpa(q[rows], k[rows], v[rows], None, scale, groups)
        else:
            length = span.start_pos + span.num_tokens
            kc, vc = _gather_pages(layer, span.block_ids, 1)[:, 0, :length].unbind(0)
            res = _grouped_sdpa(q[rows], kc, vc, span.mask, scale, groups)
        out[rows] = res.reshape(span.num_tokens, num_heads * head_dim)
    return out


def _decode(q: torch.Tensor, layer: LayerKV, dec: DecodeGroup, scale: float, groups: int) -> torch.Tensor:
    """One token per sequence over its gathered pages; query heads grouped under their KV head.
    Returns ``[S, Hkv, G, D]`` (possibly non-contiguous)."""
    seqs, num_heads, head_dim = q.shape
    kv_heads = num_heads // groups
    if seqs >= DECODE_FLAT_MIN_SEQS and kv_heads <= DECODE_FLAT_MAX_KV_HEADS:
        return _decode_flat(q, layer, dec, scale, kv_heads)
    kc, vc = _gather_pages(layer, dec.block_ids, seqs).transpose(2, 3).unbind(0)  # [S, Hkv, L, D]
    qf = q.view(seqs, kv_heads, groups, head_dim)
    return F.scaled_dot_product_attention(qf, kc, vc, attn_mask=dec.mask, scale=scale)


def _decode_flat(
    q: torch.Tensor, layer: LayerKV, dec: DecodeGroup, scale: float, kv_heads: int
) -> torch.Tensor:
    """Decode attention as two batched GEMMs over the gathered pages viewed ``[S, L, Hkv * D]``
    (no transpose copy): each query is zero-padded to ``Hkv * D`` outside its own KV head's slot,
    so ``q . k`` over the concatenated heads is its head's score. Costs ``Hkv`` times the (tiny)
    attention FLOPs, so it is used for few KV heads and many sequences, where it beats the fused
    SDPA kernel's per-(sequence, head) overhead on CPU."""
    seqs, num_heads, head_dim = q.shape
    groups = num_heads // kv_heads
    kc, vc = _gather_pages(layer, dec.block_ids, seqs).view(2, seqs, -1, kv_heads * head_dim).unbind(0)
    qp = q.view(seqs, kv_heads, groups, 1, head_dim) * layer.head_mask
    scores = torch.baddbmm(
        dec.mask.view(seqs, 1, -1), qp.view(seqs, num_heads, -1), kc.transpose(1, 2), alpha=scale
    )
    out = torch.bmm(scores.softmax(dim=-1), vc).view(seqs, kv_heads, groups, kv_heads, head_dim)
    return torch.diagonal(out, dim1=1, dim2=3).permute(0, 3, 1, 2)  # [S, Hkv, G, D]


def _grouped_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, groups: int
) -> torch.Tensor:
    """4-D SDPA (the fused CPU/GPU kernels want 4-D) with query heads grouped under their KV head
    (``[Hkv, G, n, D]``) and K/V broadcast over the group by a stride-0 expand (no copy).
    ``mask`` None means causal over the chunk itself; returns ``[n, Hq, D]``."""
    n, num_heads, head_dim = q.shape
    length, kv_heads = k.shape[0], k.shape[1]
    qg = q.view(n, kv_heads, groups, head_dim).permute(1, 2, 0, 3)
    kg = k.transpose(0, 1).unsqueeze(1).expand(kv_heads, groups, length, head_dim)
    vg = v.transpose(0, 1).unsqueeze(1).expand(kv_heads, groups, length, head_dim)
    if mask is None:
        res = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
    else:
        res = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    return res.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
