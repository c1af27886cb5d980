"""The rank-list picture: one row per query, the query (framed grey) then its top-k gallery images,
each framed green when it is the query's identity and red otherwise. Gallery images of the query's
identity seen by the query's camera are left out, as in the evaluation protocol."""
from __future__ import annotations

import numpy as np
import torch

GREEN = (0, 200, 0)
RED = (220, 0, 0)
GREY = (128, 128, 128)
BACKGROUND = (255, 255, 255)


def ranklist_size(n_queries: int, top: int, cell: tuple = (128, 64), border: int = 3, pad: int = 4,
                  gap: int = 12) -> tuple:
    """(width, height) of the picture: cells of ``cell`` (h, w) inside ``border``-pixel frames,
    ``pad`` pixels between cells and around, ``gap`` extra after the query."""
    ch, cw = cell
    fw, fh = cw + 2 * border, ch + 2 * border
    return pad + fw + gap + top * (fw + pad), pad + n_queries * (fh + pad)


def rank_lists(dist: torch.Tensor, q_pids, g_pids, q_camids, g_camids, top: int = 10) -> list:
    """Per query, the gallery indices of its ``top`` nearest (protocol filter applied) and whether
    each is a match: a list of (indices, matches)."""
    q_pids, g_pids = torch.as_tensor(q_pids), torch.as_tensor(g_pids)
    q_camids, g_camids = torch.as_tensor(q_camids), torch.as_tensor(g_camids)
    out = []
    for i in range(dist.shape[0]):
        drop = (g_pids == q_pids[i]) & (g_camids == q_camids[i])
        order = torch.argsort(dist[i].masked_fill(drop, float("inf")), stable=True)
        order = order[~drop[order]][:top]
        out.append((order.tolist(), (g_pids[order] == q_pids[i]).tolist()))
    return out


def _cell(path: str, cell: tuple):
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB").resize((cell[1], cell[0]), Image.BILINEAR)


def draw_ranklist(out_path: str, query_paths: list, gallery_paths: list, lists: list, top: int = 10,
                  cell: tuple = (128, 64), border: int = 3, pad: int = 4, gap: int = 12) -> tuple:
    """Write the PNG (``lists`` from :func:`rank_lists`, one per query path); returns (width, height)."""
    from PIL import Image, ImageDraw
    w, h = ranklist_size(len(query_paths), top, cell, border, pad, gap)
    canvas = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    ch, cw = cell
    fw, fh = cw + 2 * border, ch + 2 * border

    def put(path, x, y, colour):
        draw.rectangle([x, y, x + fw - 1, y + fh - 1], fill=colour)
        canvas.paste(_cell(path, cell), (x + border, y + border))

    for row, (qpath, (idx, match)) in enumerate(zip(query_paths, lists)):
        y = pad + row * (fh + pad)
        put(qpath, pad, y, GREY)
        for j, (g, ok) in enumerate(zip(idx[:top], match[:top])):
            put(gallery_paths[g], pad + fw + gap + j * (fw + pad), y, GREEN if ok else RED)
    canvas.save(out_path, format="PNG")
    return w, h


def frame_colour(png, row: int, col: int, cell: tuple = (128, 64), border: int = 3, pad: int = 4,
                 gap: int = 12) -> tuple:
    """The frame colour of cell ``col`` (0 = query, 1.. = rank) of ``row`` in a picture (a path or an
    array): the pixel at the middle of the cell's top frame edge."""
    from PIL import Image
    arr = np.asarray(Image.open(png).convert("RGB")) if isinstance(png, str) else np.asarray(png)
    ch, cw = cell
    fw, fh = cw + 2 * border, ch + 2 * border
    x = pad if col == 0 else pad + fw + gap + (col - 1) * (fw + pad)
    y = pad + row * (fh + pad)
    return tuple(int(v) for v in arr[y + border // 2, x + fw // 2])
