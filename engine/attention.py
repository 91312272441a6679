"""Paged attention over the layer-major KV pool (``kv_layout.KVLayout``), in pure PyTorch.

Lifecycle of one step:

1. :func:`build_attention_metadata` turns the step's chunks into flat tensors once: the position
   and KV slot of every new token (``slot = block_table[pos // bs] * bs + pos % bs``), the decode
   group (chunks of one token, batched together) and the prefill chunks (several tokens each).
2. Per layer, :func:`write_kv` stores the new tokens' K (post-RoPE) and V into their slots.
3. Per layer, :func:`paged_attention` computes causal attention of every new query over its
   sequence's whole context (cached prefix + new tokens):

   * decode group: one padded gather of the sequences' pages ``[S, blocks*bs, Hkv, D]`` and one
     masked SDPA call, with the query heads folded onto their KV head (``[S, Hkv, G, D]``) so
     grouped-query attention never materialises repeated K/V;
   * a prefill chunk with no cached prefix attends to its own fresh K/V with ``is_causal``;
   * a prefill chunk after a cached prefix gathers its pages and uses an offset causal mask
     (query ``i`` sees keys ``j <= start_pos + i``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.batch import SeqChunk


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
    block_ids: torch.Tensor  # int64 [Sd, max blocks] (padded with block 0, masked out)
    mask: torch.Tensor  # bool [Sd, 1, 1, max blocks * bs]: key position < context length
    is_whole_batch: bool  # every token of the batch is in the group, in order


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # int64 [T]
    slots: torch.Tensor  # int64 [T]
    decode: DecodeGroup | None
    prefills: list[PrefillSpan]


def build_attention_metadata(
    chunks: list[SeqChunk], block_size: int, device: torch.device
) -> AttentionMetadata:
    """Flatten a step's chunks (already validated) into the tensors every layer reuses."""
    positions: list[int] = []
    tables: list[list[int]] = []
    lens: list[int] = []
    ends: list[int] = []
    decode_rows: list[int] = []
    decode_seqs: list[int] = []
    spans: list[tuple[int, int, int, int]] = []  # (seq, token_start, n, start_pos)
    offset = 0
    for seq, chunk in enumerate(chunks):
        n = len(chunk.token_ids)
        end = chunk.start_pos + n
        tables.append(chunk.block_table[: -(-end // block_size)])
        positions.extend(range(chunk.start_pos, end))
        lens.append(n)
        ends.append(end)
        if n == 1:
            decode_rows.append(offset)
            decode_seqs.append(seq)
        else:
            spans.append((seq, offset, n, chunk.start_pos))
        offset += n
    width = max(len(t) for t in tables)
    table_pad = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    pos_t = torch.tensor(positions, dtype=torch.int64)
    seq_of = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(lens))
    slots = table_pad[seq_of, pos_t // block_size] * block_size + pos_t % block_size
    prefills: list[PrefillSpan] = []
    for seq, token_start, n, start_pos in spans:
        if start_pos == 0:
            prefills.append(PrefillSpan(token_start, n, 0, None, None))
            continue
        end = start_pos + n
        mask = torch.arange(end)[None, :] <= torch.arange(start_pos, end)[:, None]
        ids = table_pad[seq, : len(tables[seq])]
        prefills.append(PrefillSpan(token_start, n, start_pos, ids.to(device), mask.to(device)))
    decode = None
    if decode_rows:
        dec_width = max(len(tables[s]) for s in decode_seqs)
        dec_lens = torch.tensor([ends[s] for s in decode_seqs], dtype=torch.int64)
        dec_mask = (torch.arange(dec_width * block_size)[None, :] < dec_lens[:, None])[:, None, None, :]
        decode = DecodeGroup(
            token_idx=torch.tensor(decode_rows, dtype=torch.int64).to(device),
            block_ids=table_pad[decode_seqs, :dec_width].to(device),
            mask=dec_mask.to(device),
            is_whole_batch=len(decode_rows) == offset,
        )
    return AttentionMetadata(pos_t.to(device), slots.to(device), decode, prefills)


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store ``k, v [T, Hkv, D]`` into one layer's pages ``kv_layer [2, blocks, bs, Hkv, D]``."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_layer.shape
    flat = kv_layer.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, slots, k.to(flat.dtype))
    flat[1].index_copy_(0, slots, v.to(flat.dtype))


def _gather_pages(pages: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``pages [blocks, bs, Hkv, D]`` gathered by ``block_ids [..., nb]`` -> ``[..., nb*bs, Hkv, D]``
    (``index_select`` on the flat ids: much cheaper on CPU than advanced indexing)."""
    got = pages.index_select(0, block_ids.reshape(-1))
    return got.view(*block_ids.shape[:-1], -1, pages.shape[-2], pages.shape[-1])


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention output ``[T, Hq * D]`` for queries ``q [T, Hq, D]``; ``k, v [T, Hkv, D]`` are the
    new tokens' keys/values (already written into ``kv_layer``)."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = num_heads // kv_heads
    k_pages, v_pages = kv_layer[0], kv_layer[1]
    dec = meta.decode
    if dec is not None and dec.is_whole_batch:
        return _decode(q, k_pages, v_pages, dec, scale, groups).reshape(num_tokens, num_heads * head_dim)
    out = q.new_empty(num_tokens, num_heads * head_dim)
    if dec is not None:
        res = _decode(q.index_select(0, dec.token_idx), k_pages, v_pages, dec, scale, groups)
        out.index_copy_(0, dec.token_idx, res.reshape(-1, num_heads * head_dim))
    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        if span.block_ids is None or span.mask is None:
            res = _prefill_fresh(q[rows], k[rows], v[rows], scale, groups)
        else:
            kc = _gather_pages(k_pages, span.block_ids)[: span.start_pos + span.num_tokens]
            vc = _gather_pages(v_pages, span.block_ids)[: span.start_pos + span.num_tokens]
            res = _prefill_cached(q[rows], kc, vc, span.mask, scale, groups)
        out[rows] = res.reshape(span.num_tokens, num_heads * head_dim)
    return out


def _decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    dec: DecodeGroup,
    scale: float,
    groups: int,
) -> torch.Tensor:
    """One token per sequence over its gathered pages; query heads grouped under their KV head."""
    seqs, num_heads, head_dim = q.shape
    kv_heads = num_heads // groups
    kc = _gather_pages(k_pages, dec.block_ids).transpose(1, 2)  # [S, Hkv, L, D]
    vc = _gather_pages(v_pages, dec.block_ids).transpose(1, 2)
    qf = q.view(seqs, kv_heads, groups, head_dim)
    res = F.scaled_dot_product_attention(qf, kc, vc, attn_mask=dec.mask, scale=scale)
    return res.reshape(seqs, num_heads, head_dim)


def _prefill_fresh(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, groups: int
) -> torch.Tensor:
    """Causal attention of a chunk over itself only (no cached prefix): ``[n, Hq, D]``."""
    return _grouped_sdpa(q, k, v, None, scale, groups)


def _prefill_cached(
    q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor, scale: float, groups: int
) -> torch.Tensor:
    """Chunk after a cached prefix; ``kc, vc [L, Hkv, D]``, ``mask [n, L]`` -> ``[n, Hq, D]``."""
    return _grouped_sdpa(q, kc, vc, mask, scale, groups)


def _grouped_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, groups: int
) -> torch.Tensor:
    """4-D SDPA (the fused CPU/GPU kernels want 4-D) with query heads grouped under their KV head
    (``[Hkv, G, n, D]``) and K/V broadcast over the group by a stride-0 expand (no copy)."""
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
