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

The same object owns the recursion's layout. Per layer (the default), each recorded layer has
a K of its own. With embed.joint_layers the recorded layers' rows are concatenated into one
layer `joint` (and each block (a, b) into `joint@ab`), so K couples the layers
(docs/method.md §3 "Layers"); every row, test gradient and sum enters the recursion through
`augment`, so nothing else needs to know which layout a run has.

Members (capture.members = k): each recorded layer comes k times, member j's under its own
name (`<layer>~j`, capture/projection.py), projected with matrices of its own and, under the
sampled Fisher, with label draws of its own. Each member is a recursion of its own (its layers
apart, or joined into `joint~j`); a value is the mean of the members' and its standard error
their spread over √k, which takes in every source of estimation noise the members do not
share (projection and labels), where the blocks see the projection's only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rayattr.capture.projection import member_name, member_of
from rayattr.embed.cut import record_choice

SEP = "@"
JOINT = "joint"


def is_block(name: str) -> bool:
    return SEP in name


class ProjectionBlocks:
    """The q² blocks of every layer of a run projected at ranks (r_out, r_in), in the
    recursion's layout: per recorded layer, or (`joint`) all of them as one."""

    def __init__(self, dims: Mapping[str, int], r_out: int, r_in: int, q: int, joint: bool = False,
                 members: int = 1):
        self.q = q
        self.recorded = dict(dims)  # the layers rows and test gradients come in
        self.joint = joint
        self.members = members
        self.of_member: list[list[str]] = [[] for _ in range(members)]  # recorded names by member
        for name in self.recorded:
            j = member_of(name)[1]
            if j >= members:
                raise ValueError(f"layer {name!r} is member {j} of a run with {members} members")
            self.of_member[j].append(name)
        if len({tuple(member_of(n)[0] for n in names) for names in self.of_member}) > 1:
            raise ValueError(f"the {members} members do not hold the same layers: {self.of_member}")
        self.layers = ({member_name(JOINT, j): sum(self.recorded[n] for n in names)
                        for j, names in enumerate(self.of_member)}
                       if joint else dict(self.recorded))  # the recursion's
        # the recursion's layers by member: what each member's estimate of a value sums
        self.recursion_of_member = ([[member_name(JOINT, j)] for j in range(members)] if joint
                                    else self.of_member)
        self.index: dict[str, torch.Tensor] = {}
        if q < 2 or r_out % q or r_in % q:
            return  # no blocks: no standard errors
        if members > 1:
            raise ValueError(f"projection blocks (q = {q}) and {members} members: the members' spread is the "
                             "standard error; use one or the other")
        offsets, at = {}, 0
        for name, p in self.recorded.items():
            if p != r_out * r_in:
                raise ValueError(f"layer {name!r}: width {p} is not r_out*r_in = {r_out}*{r_in}")
            offsets[name], at = at, at + p
        rows = torch.arange(r_out).reshape(q, r_out // q)
        cols = torch.arange(r_in).reshape(q, r_in // q)
        blocks = {f"{a}{b}": (rows[a][:, None] * r_in + cols[b][None, :]).reshape(-1) for a in range(q) for b in range(q)}
        if joint:  # block (a, b) of every layer, side by side in the joint row
            for ab, idx in blocks.items():
                self.index[f"{JOINT}{SEP}{ab}"] = torch.cat([idx + offsets[n] for n in self.recorded])
            return
        for name in self.recorded:
            for ab, idx in blocks.items():
                self.index[f"{name}{SEP}{ab}"] = idx

    @classmethod
    def for_run(cls, manifest: dict, q: int) -> "ProjectionBlocks":
        dims = {k: int(v) for k, v in manifest["layer_dims"].items()}
        joint = bool(manifest.get("joint_layers", False))  # as `register` recorded it
        spec = manifest.get("projection") or {}
        if not spec:  # exact gradients: nothing to split
            return cls(dims, 1, 1, 1, joint)
        rank = int(spec["rank"])
        return cls(dims, int(spec.get("rank_out") or rank), int(spec.get("rank_in") or rank), q, joint,
                   int(spec.get("members") or 1))

    @classmethod
    def register(cls, run, q: int, joint: bool = False) -> "ProjectionBlocks":
        """The run's layout (`joint_layers`) and blocks, recorded in its manifest, the blocks and
        the joint layer as `derived_layers` so that the segment actors' writers accept them (call
        before the embedding stage; every later reader takes the layout from there). Once a
        segment artefact exists, another layout is refused: K's and embeddings of both would mix."""
        record_choice(run, "joint_layers", bool(joint), False)  # runs from before the key: per layer
        blocks = cls.for_run({**run.manifest, "joint_layers": joint}, q)
        run.update_manifest(derived_layers={n: p for n, p in blocks.dims.items() if n not in blocks.recorded})
        return blocks

    @property
    def enabled(self) -> bool:
        """Whether values come with standard errors (from blocks or members)."""
        return bool(self.index) or self.members > 1

    @property
    def weight(self) -> float:
        """What each recursion layer's part of a sum over layers counts for: 1/members, as a
        value is the members' mean."""
        return 1.0 / self.members

    @property
    def dims(self) -> dict[str, int]:
        """Real layers and block layers with their widths."""
        return {**self.layers, **{n: len(i) for n, i in self.index.items()}}

    def join(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows (…, p) of the recorded layers in the recursion's layers (no blocks)."""
        if not self.joint:
            return dict(grads)
        return {member_name(JOINT, j): torch.cat([grads[n] for n in names], dim=-1)
                for j, names in enumerate(self.of_member)}

    def augment(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows (…, p) of every recorded layer as the recursion takes them: its layers plus
        their block layers (columns picked, scaled by q)."""
        out = self.join(grads)
        for name, idx in self.index.items():
            out[name] = out[name.split(SEP)[0]][..., idx] * self.q
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
        layers, standard error over the blocks' estimates or None without blocks); with members,
        (the members' mean, their spread over √k)."""
        f64 = torch.float64  # layers summed in float64, whatever the rows' precision
        if self.members > 1:
            est = torch.stack([sum(scores[n].to(f64) for n in names)
                               for names in self.recursion_of_member])  # (k, B[, Q])
            return est.mean(0), est.std(0, correction=1) / self.members ** 0.5
        value = sum(scores[n].to(f64) for n in self.layers)
        if not self.enabled:
            return value, None
        q = self.q
        est = torch.stack([sum(scores[f"{n}{SEP}{a}{b}"].to(f64) for n in self.layers)
                           for a in range(q) for b in range(q)])  # (q², B[, Q])
        return value, est.std(0, correction=1)
