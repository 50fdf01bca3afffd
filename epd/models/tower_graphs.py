"""The vision tower of a fixed-tile family (LLaVA, InternVL) replayed from CUDA graphs, by tile count.

Run eagerly, a tower issues several hundred kernels a batch from Python: for one image that is most of its
time (~10 ms eager against 2.3 ms replayed for one CLIP-L/336 image on an H200), and while the worker's preparation threads hold the
interpreter for the next batch's images it stretches a 32-image batch to about twice its GPU time. A graph
replays the whole tower in one call.

Graphs are captured for 1..8 tiles and every multiple of 8 up to `max_tiles`; a batch is cut greedily into
captured sizes (27 tiles: 24 + 3; above `max_tiles`, pieces of `max_tiles`), so nothing is padded and no
FLOP is wasted. Tiles are encoded independently, so cutting a batch changes no image's result beyond the
rounding of a different GEMM shape. Without capture (CPU, tests) the same pieces run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_sizes(max_tiles: int) -> tuple[int, ...]:
    """Tile counts to capture: 1..8, then multiples of 8, and `max_tiles` itself."""
    if max_tiles < 1:
        raise ValueError(f"tower graphs need max_tiles >= 1, got {max_tiles}")
    sizes = set(range(1, min(8, max_tiles) + 1)) | set(range(8, max_tiles + 1, 8)) | {max_tiles}
    return tuple(sorted(sizes))


def pieces(n: int, sizes: tuple[int, ...]) -> list[int]:
    """`n` tiles cut into captured sizes, largest first (1 is always captured, so any n splits)."""
    out = []
    while n > 0:
        take = max(s for s in sizes if s <= n)
        out.append(take)
        n -= take
    return out


class TowerGraphs:
    def __init__(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        tile_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        max_tiles: int,
        capture: bool = True,
    ):
        self.encode, self.sizes = encode, graph_sizes(max_tiles)
        self.capture = capture
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self.pixels = torch.zeros((max(self.sizes), *tile_shape), dtype=dtype, device=device)  # the graphs' input
            self.pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for size in sorted(self.sizes, reverse=True):  # the largest first: the smaller ones reuse its pool
                    encode(self.pixels[:size])  # library set-up (cuBLAS, cuDNN plans) outside the capture
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                        out = encode(self.pixels[:size])
                    self.graphs[size] = (graph, out)
            torch.cuda.current_stream(device).wait_stream(stream)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] normalised pixels -> [tiles, tokens, hidden], piece by piece."""
        cut = pieces(pixels.shape[0], self.sizes)
        if not self.capture:
            return torch.cat([self.encode(part) for part in pixels.split(cut)])
        outs = []
        for i, (size, part) in enumerate(zip(cut, pixels.split(cut))):
            graph, out = self.graphs[size]
            self.pixels[:size].copy_(part)
            graph.replay()
            # A graph's output is overwritten by its next replay (later in this batch, or the next batch).
            outs.append(out.clone() if size in cut[i + 1 :] or len(cut) == 1 else out)
        return outs[0] if len(outs) == 1 else torch.cat(outs)
