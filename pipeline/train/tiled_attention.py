"""Attention of packed rows in tiles of queries, for the sdpa backend.

A packed row of L tokens holds many short examples. transformers' sdpa path gives the kernel an L x L
block-diagonal causal mask, so every query is scored against all L keys of its row although it may
only see the keys of its own example. Here the row's queries are cut into tiles of TILE, and each tile
is scored against the keys its examples can reach: its own TILE positions and the `reach` before them,
where reach is the furthest any tile's first query sits from the start of its example (its
position_id). The mask still blocks every key of another example, so the result is the same attention;
the work per row drops from L x L to L x (TILE + reach). Rows of long examples, where that would not
halve the work, keep transformers' own mask (tile_layout returns nothing for them).

The layout (the tiles' mask and the reach) is built with numpy by collate, on the prefetch thread, and
reaches the attention function as forward keyword arguments, which transformers hands to every layer's
attention. The model runs it under its own attention name (NAME), which falls back to transformers'
sdpa function for any batch without a layout (unpacked rows, generation).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

NAME = "ftpipe_tiled_sdpa"
TILE = 32  # queries per tile: measured best on CPU among 32, 64 and 128 (the flash kernel's query block)
KEYS = ("tile_mask", "tile_reach")


def tile_layout(positions: np.ndarray) -> dict[str, Any]:
    """The tiles' mask, (rows x tiles, 1, TILE, TILE + reach) bool, and the reach, for packed rows whose
    position_ids restart at 0 for every example (padding tokens: 0 each, examples of their own); {} when
    tiles would not halve the attention's work."""
    rows, width = positions.shape
    tiles = -(-width // TILE)
    reach = int(positions[:, ::TILE].max())
    keys = TILE + reach
    if 2 * keys > tiles * TILE:
        return {}
    # Positions past the row (up to a whole tile) are examples of one token each, like padding.
    positions = np.pad(positions, ((0, 0), (0, tiles * TILE - width)))
    example = np.cumsum(positions == 0, axis=1)  # an example's number within its row, from 1
    query = np.arange(tiles * TILE).reshape(tiles, TILE)
    key = query[:, :1] - reach + np.arange(keys)  # (tiles, keys): the positions a tile's keys come from
    key_example = np.where(key >= 0, example[:, np.clip(key, 0, None)], 0)  # 0: before the row
    same = example.reshape(rows, tiles, TILE, 1) == key_example[:, :, None, :]
    mask = same & (key[None, :, None, :] <= query[None, :, :, None])
    return {"tile_mask": torch.from_numpy(mask.reshape(rows * tiles, 1, TILE, keys)), "tile_reach": reach}


def tiled_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, tile_mask: torch.Tensor | None = None,
               tile_reach: int = 0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, length, head_dim) in,
    (batch, length, heads, head_dim) out. With a layout, the tiles go through transformers' own sdpa
    function (its GQA, dropout and scaling handling) as a batch of rows x tiles short rows."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if tile_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, heads, width, dim = query.shape
    tiles = tile_mask.size(0) // rows
    extra = tiles * TILE - width
    queries = F.pad(query, (0, 0, 0, extra)).view(rows, heads, tiles, TILE, dim).transpose(1, 2)
    keys, values = (_key_windows(states, tile_reach, extra) for states in (key, value))
    out, _ = sdpa_attention_forward(module, queries.reshape(rows * tiles, heads, TILE, dim), keys, values,
                                    tile_mask, **kwargs)
    return out.view(rows, tiles * TILE, heads, out.size(-1))[:, :width], None


def _key_windows(states: torch.Tensor, reach: int, extra: int) -> torch.Tensor:
    """(batch, heads, length, dim) -> (batch x tiles, heads, TILE + reach, dim): tile t's keys are the
    positions t*TILE - reach .. (t+1)*TILE - 1, zeros before the row (masked)."""
    rows, heads, _, dim = states.shape
    windows = F.pad(states, (0, 0, reach, extra)).unfold(2, TILE + reach, TILE)  # (b, h, tiles, dim, keys)
    return windows.permute(0, 2, 1, 4, 3).reshape(-1, heads, TILE + reach, dim)


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
