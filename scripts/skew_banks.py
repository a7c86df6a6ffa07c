#!/usr/bin/env python3
"""Shared-memory wavefronts of the near kernel's skews, by a bank model (no GPU): for each of its four accesses
(the two window products' four-byte stores, C2P's and P2C's two-byte skewed reads) and a choice of orders, the mean
number of wavefronts a warp's instruction takes (1 is conflict-free).

The model: a wgmma accumulator's lane l of warp w holds rows 16w + 8h + l // 4 and columns 8k + 2(l % 4) + e; a
shared access takes as many wavefronts as the most distinct four-byte words on one of 32 banks. The buffers are
those of `window_band._skew_mma`: products stored at a row pitch of 130 two-byte elements, read at 129 from column
64 on. Orders are bit tables (`window_band.SPREAD_BITS`): bit b of a buffer index holds the tile index TABLE[b].
It reproduces ncu's counts of the orders measured (NOTES.md: v40's 2-way C2P read in the order of v17 ... v42, none
in v43 and v44). A second table counts the same for NOTES.md item 1's shared P2C product (`shared_p2c`).

    python scripts/skew_banks.py
"""

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deberta_tools import fused_attention, report  # noqa: E402

wb = fused_attention.window_band  # (imported through fused_attention: window_band alone would import in a circle)

NATURAL = (1, 2, 4, 8, 16, 32)
KEY_ORDER_V17 = (8, 1, 16, 32, 2, 4)  # the score tile's keys from v17 to v43 (`_key_order`, removed in v44)
# (name, the product rows' buffer order, the score tile's keys, its queries)
ORDERS = [
    ("v17 ... v42 (keys in key order)", wb.SPREAD_BITS, KEY_ORDER_V17, NATURAL),
    ("v43 (and queries in query order)", wb.SPREAD_BITS, KEY_ORDER_V17, (8, 1, 2, 4, 16, 32)),
    ("committed (v44: keys spread)", wb.SPREAD_BITS, wb.SPREAD_BITS, wb.SPREAD_QUERY_BITS),
]


def buffer_index(n: int, bits) -> int:
    """The buffer index holding tile index n under a bit table."""
    return sum(1 << b for b, value in enumerate(bits) if n & value)


def wavefronts(words) -> int:
    banks = {}
    for word in words:
        banks.setdefault(word % 32, set()).add(word)
    return max(len(held) for held in banks.values())


def mean_wavefronts(halfword, width: int, columns=(0, 1)) -> float:
    """Mean over a warpgroup's instructions on a [64, width] tile of the wavefronts of halfword(row, column) // 2
    for its 32 lanes."""
    counts = [wavefronts([halfword(16 * w + 8 * h + l // 4, 8 * k + 2 * (l % 4) + e) // 2 for l in range(32)])
              for w, h, k, e in itertools.product(range(4), range(2), range(width // 8), columns)]
    return sum(counts) / len(counts)


def _tile_orders(keys, queries) -> tuple[dict, dict]:
    """The buffer index of each of the tile's 64 keys and 64 queries under their bit tables."""
    return {c: buffer_index(c, keys) for c in range(64)}, {n: buffer_index(n, queries) for n in range(64)}


def accesses(rows, keys, queries) -> dict:
    """Mean wavefronts of the four skew accesses under these orders: the [64, 128] products' stores (pitch 130) and
    P2C's read (129) as `shared_p2c` counts them for one query block, and C2P's read (129)."""
    p2c = shared_p2c(rows, keys, queries, blocks=1, pitch=130)
    key, query = _tile_orders(keys, queries)
    return {"product stores": p2c["product stores"],
            "C2P read": mean_wavefronts(lambda n, c: query[n] * 129 + 64 + key[c], 64),
            "P2C read": p2c["P2C read, block 0"]}


def shared_p2c(rows, keys, queries, blocks: int = 2, pitch: int = 258) -> dict:
    """One P2C product [64 keys, 64 (blocks + 1) distances] serving `blocks` query blocks of 64 (a warpgroup each),
    stored straight from its MMA layout (pairs of columns, row n at buffer row buffer_index(n, rows)) at a row pitch
    of `pitch` two-byte elements and read by each block at pitch - 1 from column 64 (g + 1) on. The near kernel's is
    one block at pitch 130; NOTES.md item 1's shape is two: Gluon's padded layouts pad at power-of-two intervals, so
    its 192-column product sits in a 256-column buffer, pitch 258 / 257."""
    key, query = _tile_orders(keys, queries)
    out = {"product stores": mean_wavefronts(lambda n, c: buffer_index(n, rows) * pitch + c, 64 * (blocks + 1),
                                             columns=(0,))}
    for g in range(blocks):
        out[f"P2C read, block {g}"] = mean_wavefronts(lambda n, c: key[c] * (pitch - 1) + 64 * (g + 1) + query[n], 64)
    return out


def main():
    rows = [[name] + [f"{v:.2f}" for v in accesses(*orders).values()] for name, *orders in ORDERS]
    print(report.table(["orders", "product stores", "C2P read", "P2C read"], rows))
    committed = (wb.SPREAD_BITS, wb.SPREAD_BITS, wb.SPREAD_QUERY_BITS)
    rows = [[str(pitch)] + [f"{v:.2f}" for v in shared_p2c(*committed, pitch=pitch).values()] for pitch in (258, 256)]
    print("\nNOTES.md item 1 (one [64, 192] P2C product for two query blocks), committed orders:")
    print(report.table(["store pitch", "product stores", "P2C read, block 0", "P2C read, block 1"], rows))


if __name__ == "__main__":
    main()
