"""Projection blocks: a per-occurrence standard error from the projection itself.

A layer's projected gradient is the r_s × r_a matrix P_s G P_aᵀ. Cutting the rows of P_s and
of P_a into q groups cuts it into q² blocks; block (a, b) is the same gradient seen through a
smaller projection (ranks r_s/q and r_a/q), and scaled by q its inner products estimate the
same quantities without bias. Running the recursion on every block as if it were a layer of
its own (a "block layer" `<layer>@<a><b>`) gives q² estimates of each value next to the full
one, and their spread is the standard error reported with it. Not the spread over q: the
full estimate is no mean of the blocks (the recursion mixes them), and measured against the
spread of values over independent projection seeds on the built-in run, the blocks' spread
itself matches (docs/method.md, "Uncertainty"). The block layers ride through segments, K
chain and sums like real layers; only values treat them apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

SEP = "@"


def is_block(name: str) -> bool:
    return SEP in name


class ProjectionBlocks:
    """The q² blocks of every layer of a run projected at ranks (r_out, r_in)."""

    def __init__(self, dims: Mapping[str, int], r_out: int, r_in: int, q: int):
        self.q = q
        self.layers = dict(dims)
        self.index: dict[str, torch.Tensor] = {}
        if q < 2 or r_out % q or r_in % q:
            return  # no blocks: no standard errors
        for name, p in self.layers.items():
            if p != r_out * r_in:
                raise ValueError(f"layer {name!r}: width {p} is not r_out*r_in = {r_out}*{r_in}")
            rows = torch.arange(r_out).reshape(q, r_out // q)
            cols = torch.arange(r_in).reshape(q, r_in // q)
            for a in range(q):
                for b in range(q):
                    self.index[f"{name}{SEP}{a}{b}"] = (rows[a][:, None] * r_in + cols[b][None, :]).reshape(-1)

    @classmethod
    def for_run(cls, manifest: dict, q: int) -> "ProjectionBlocks":
        dims = {k: int(v) for k, v in manifest["layer_dims"].items()}
        spec = manifest.get("projection") or {}
        if not spec:  # exact gradients: nothing to split
            return cls(dims, 1, 1, 1)
        rank = int(spec["rank"])
        return cls(dims, int(spec.get("rank_out") or rank), int(spec.get("rank_in") or rank), q)

    @classmethod
    def register(cls, run, q: int) -> "ProjectionBlocks":
        """The run's blocks, recorded in its manifest as `derived_layers` so that the segment
        actors' writers accept the block layers (call before the embedding stage)."""
        blocks = cls.for_run(run.manifest, q)
        run.update_manifest(derived_layers={n: p for n, p in blocks.dims.items() if is_block(n)})
        return blocks

    @property
    def enabled(self) -> bool:
        return bool(self.index)

    @property
    def dims(self) -> dict[str, int]:
        """Real layers and block layers with their widths."""
        return {**self.layers, **{n: len(i) for n, i in self.index.items()}}

    def augment(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows (…, p) of every layer plus their block layers (columns picked, scaled by q)."""
        out = dict(grads)
        for name, idx in self.index.items():
            out[name] = grads[name.split(SEP)[0]][..., idx] * self.q
        return out

    def values(self, emb: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per row: the value over real layers, and its standard error from the blocks (None
        without blocks). `emb` rows (B, p) per layer; `test` (p,) per layer, or (Q, p) for Q
        test points (then (B, Q) results); blocks included."""
        def dot(e, t):
            return e @ (t.T if t.ndim == 2 else t)

        return self.combine({n: dot(emb[n], test[n]) for n in emb if n in test})

    def combine(self, scores: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-layer scores (each row's e·v of one layer or block layer) -> (value over the real
        layers, standard error over the blocks' estimates or None without blocks)."""
        f64 = torch.float64  # layers summed in float64, whatever the rows' precision
        value = sum(scores[n].to(f64) for n in self.layers)
        if not self.enabled:
            return value, None
        q = self.q
        est = torch.stack([sum(scores[f"{n}{SEP}{a}{b}"].to(f64) for n in self.layers)
                           for a in range(q) for b in range(q)])  # (q², B[, Q])
        return value, est.std(0, correction=1)
