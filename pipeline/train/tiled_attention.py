"""Attention of packed rows in tiles of queries, for the sdpa backend.

A packed row of L tokens holds many short examples. transformers' sdpa path gives the kernel an L x L
block-diagonal causal mask, so every query is scored against all L keys of its row although it may
only see the keys of its own example. Here the row's queries are cut into tiles of TILE, and each tile
is scored only against the keys its examples can reach: its own TILE positions and the `reach` before
them, the position_id of the tile's first query (how far its example started before the tile).

One long example must not cost every tile its keys: tiles are grouped by their reach, rounded up to a
class (a multiple of TILE with at most two significant bits: 0, 1, 2, 3, 4, 6, 8, 12 ... tiles), and
each class is one sdpa call over its tiles. The mask still blocks every key of another example (and
keys gathered from before the row), so the result is the same attention. Batches whose tiles would
not halve the work keep transformers' own mask (tile_layout returns nothing for them).

Grouped-query attention runs on the key/value heads: each key head's query heads are one longer query
(the tiles' mask repeated), so keys and values are never repeated per query head.

The layout (flat gather indices, the tiles' masks and the classes) is built with numpy by collate, on
the prefetch thread, and reaches the attention function as forward keyword arguments, which
transformers hands to every layer's attention. The model runs it under its own attention name (NAME),
which falls back to transformers' sdpa function for any batch without a layout (unpacked rows,
generation) and for attention the tiles do not model (a sliding window shorter than a tile's keys,
position biases, soft-capping).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

NAME = "ftpipe_tiled_sdpa"
TILE = 32  # queries per tile: measured best on CPU among 32, 64 and 128 (the flash kernel's query block)
KEYS = ("tile_queries", "tile_keys", "tile_mask", "tile_tokens", "tile_classes")


def reach_class(reach: np.ndarray) -> np.ndarray:
    """Reach rounded up to TILE x {0, 1, 2, 3, 4, 6, 8, 12, ...}: at most 1.5x the keys a tile needs, and
    about 2 log2(tiles) classes (sdpa calls) however long the rows are."""
    steps = -(-reach // TILE)
    power = 2 ** np.floor(np.log2(np.maximum(steps, 1))).astype(np.int64)
    rounded = np.where(steps <= power, power, np.where(2 * steps <= 3 * power, 3 * power // 2, 2 * power))
    return np.where(steps > 0, rounded, 0) * TILE


def tile_work(classes: tuple[tuple[int, int], ...]) -> int:
    """Query-key pairs (per head) that tiles of these classes score."""
    return sum(count * TILE * (TILE + reach) for count, reach in classes)


def tile_layout(positions: np.ndarray) -> dict[str, Any]:
    """The tiles' layout for packed rows whose position_ids restart at 0 for every example (padding
    tokens: 0 each, examples of their own); {} when tiles would not halve the attention's work.
    Flat indices count tokens row-major over (rows, width); tiles are listed class by class."""
    rows, width = positions.shape
    tiles = -(-width // TILE)
    # Positions past the row (up to a whole tile) are examples of one token each, like padding.
    padded = np.pad(positions, ((0, 0), (0, tiles * TILE - width)))
    classes = reach_class(padded[:, ::TILE].reshape(-1))
    order = np.argsort(classes, kind="stable")
    reaches, counts = np.unique(classes[order], return_counts=True)
    listed = tuple(zip(counts.tolist(), reaches.tolist()))  # (tiles, reach) per class
    if 2 * tile_work(listed) > rows * width * width:
        return {}
    example = np.cumsum(padded == 0, axis=1)  # an example's number within its row, from 1
    parts = [_class_layout(example, width, np.divmod(chosen, tiles), int(reach))
             for reach, chosen in zip(reaches, np.split(order, np.cumsum(counts)[:-1]))]
    slots = np.concatenate([part[0] for part in parts]).reshape(-1)  # (row, position) of each query slot
    place = np.empty(rows * tiles * TILE, dtype=np.int64)
    place[slots] = np.arange(slots.size)
    return {"tile_queries": torch.from_numpy(np.minimum(slots % (tiles * TILE), width - 1)
                                             + slots // (tiles * TILE) * width),
            "tile_keys": torch.from_numpy(np.concatenate([part[1].reshape(-1) for part in parts])),
            "tile_mask": torch.from_numpy(np.concatenate([part[2].reshape(-1) for part in parts])),
            "tile_tokens": torch.from_numpy(place.reshape(rows, tiles * TILE)[:, :width].reshape(-1)),
            "tile_classes": listed}


def _class_layout(example: np.ndarray, width: int, where: tuple[np.ndarray, np.ndarray],
                  reach: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the tiles at (rows, tiles) `where` of one class: their query slots (row x padded width +
    position), their keys' flat indices (clamped into the row; those outside are masked) and their
    (tiles, TILE, TILE + reach) mask."""
    row, tile = where
    span = example.shape[1]
    query = tile[:, None] * TILE + np.arange(TILE)
    key = tile[:, None] * TILE - reach + np.arange(TILE + reach)
    key_example = np.where(key >= 0, example[row[:, None], np.clip(key, 0, None)], 0)  # 0: before the row
    same = example[row[:, None], query][:, :, None] == key_example[:, None, :]
    mask = same & (key[:, None, :] <= query[:, :, None])
    return row[:, None] * span + query, row[:, None] * width + np.clip(key, 0, width - 1), mask


def tiled_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, tile_queries: torch.Tensor | None = None,
               tile_keys: torch.Tensor | None = None, tile_mask: torch.Tensor | None = None,
               tile_tokens: torch.Tensor | None = None, tile_classes: tuple[tuple[int, int], ...] = (),
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, length, head_dim) in,
    (batch, length, heads, head_dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if tile_queries is None or not _tiles_model(kwargs, tile_classes):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, heads, width, _ = query.shape
    # One gather each, split per class: a split's backward is one cat, where each slice's backward
    # would fill a zero gradient of the whole tensor.
    sizes = [count * (TILE + reach) for count, reach in tile_classes]
    queries = _flat(query).index_select(0, tile_queries).split([count * TILE for count, _ in tile_classes])
    keys, values = (_flat(states).index_select(0, tile_keys).split(sizes) for states in (key, value))
    masks = tile_mask.split([size * TILE for size in sizes])
    outs = [_attend(*parts, mask.view(count, 1, TILE, TILE + reach), kwargs)
            for *parts, mask, (count, reach) in zip(queries, keys, values, masks, tile_classes)]
    return torch.cat(outs).index_select(0, tile_tokens).view(rows, width, heads, -1), None


def _tiles_model(kwargs: dict[str, Any], classes: tuple[tuple[int, int], ...]) -> bool:
    """Whether the tiles compute this layer's attention: what transformers' sdpa function computes
    (no position bias; soft-capping it refuses), and a sliding window, if any, that no tile's keys reach
    past (transformers puts the window in the mask the tiles replace)."""
    if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return False
    window = kwargs.get("sliding_window")
    return window is None or TILE + max(reach for _, reach in classes) <= window


def _flat(states: torch.Tensor) -> torch.Tensor:
    """(batch, heads, length, dim) -> (batch x length, heads, dim)."""
    return states.transpose(1, 2).reshape(-1, states.size(1), states.size(3))


def _attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
            kwargs: dict[str, Any]) -> torch.Tensor:
    """(tiles x TILE, heads, dim) queries against (tiles x keys, kv_heads, dim) keys and values ->
    (tiles x TILE, heads, value dim). The query heads that share a key head are one query of
    groups x TILE (the mask repeated), so no key or value is copied per query head."""
    tiles, width = mask.size(0), mask.size(-1)
    kv_heads = keys.size(1)
    groups = queries.size(1) // kv_heads
    folded = queries.view(tiles, TILE, kv_heads, groups, -1).permute(0, 2, 3, 1, 4)
    out = F.scaled_dot_product_attention(
        folded.reshape(tiles, kv_heads, groups * TILE, -1),
        keys.view(tiles, width, kv_heads, -1).transpose(1, 2),
        values.view(tiles, width, kv_heads, -1).transpose(1, 2),
        attn_mask=mask.repeat(1, 1, groups, 1) if groups > 1 else mask,
        dropout_p=kwargs.get("dropout", 0.0), scale=kwargs.get("scaling"))
    return out.view(tiles, kv_heads, groups, TILE, -1).permute(0, 3, 1, 2, 4).reshape(
        tiles * TILE, kv_heads * groups, -1)


def use_tiled_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Run a model that uses transformers' sdpa attention under NAME (same masks, same fallback)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return model
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, tiled_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return model
