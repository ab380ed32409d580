"""ZeRO-1 (mindformers' ``optimizer_shard``): AdamW whose state is sharded over data-parallel ranks.

Layout. Every parameter is sharded on its own: its flattened local tensor (n elements) is padded
with zeros to ``parts * L`` elements, L = ceil(n / parts), and data-parallel rank r owns elements
[r L, (r + 1) L). ``parts`` is the size of the parameter's replica group: dp, or ep_dp for stacked
expert weights under expert parallelism (the ranks holding the same experts). Tensor- and
pipeline-parallel ranks already hold different local tensors; ZeRO splits each of them further.
Rank r keeps three fp32 vectors of L elements per parameter (``zero_master.*``, ``zero_m.*``,
``zero_v.*``): the master weights and Adam's moments of its slice, i.e. 12 n / parts bytes
instead of the 8 n (+ 4 n fp32 master under O2) of a replicated AdamW. With fp32 parameters the
master slice duplicates this rank's slice of the parameter (the update writes it in place).

Communication is bucketed: the parameters of a bucket (``bucket_bytes`` of fp32 gradients)
travel as one (parts, sum L) matrix whose row r holds rank r's slices, one after the other.

    gradients (full, unsynchronised)  --pack-->  (parts, sum L)  --reduce-scatter rows-->  row r
    row r: L-slices of the summed gradients  --AdamW per slice (adamw_step)-->  new master slices
    new master slices (1, sum L)  --all-gather rows-->  (parts, sum L)  --unpack-->  parameters

On CPU the reduce-scatter and all-gather are emulated from sub-group AllReduce(SUM)
(:mod:`mindport.parallel.comm`): exact, but without the bandwidth saving they bring on devices.
Context-parallel sums and sequence-parallel partial sums (over tp) stay all-reduces, done by
:class:`~mindport.parallel.grad_sync.GradientSync` with the data-parallel groups left out.
``grads_synced=True`` accepts gradients already summed by ``GradientSync`` instead; each rank then
just cuts out its slices (no gradient communication in the optimizer).

Update rule: MindSpore's ``nn.AdamWeightDecay`` (m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
w -= lr (m / (sqrt(v) + eps) + wd w); no bias correction), computed per slice by
:func:`mindport.train.optim.adamw_step`, with the same weight-decay selection (ungrouped:
parameters without 'beta' or 'gamma' in their name; groups: each group's ``weight_decay``).
``bias_correction=True`` gives :class:`mindport.train.optim.AdamW` instead (torch's AdamW), so the
trainer can swap it in. The update works element by element, so slicing does not change a single
value: the parameters after a step equal the replicated optimizer's on the summed gradients.

Padding elements have zero weight and zero gradient, so their update is 0 / (0 + eps) = 0: they
stay zero forever and never reach a parameter.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from mindport.parallel.comm import collectives
from mindport.parallel.grad_sync import DEFAULT_BUCKET_BYTES, GradientSync, buckets_by_size
from mindport.parallel.sharding import rule_for
from mindport.parallel.state import Group, ParallelGroups
from mindport.train.optim import adamw_step, bias_correction


def shard_length(numel: int, parts: int) -> int:
    """Elements each of ``parts`` ranks owns of an ``numel``-element parameter (the last rank's
    slice may end in padding)."""
    return -(-numel // parts)


def shard_range(numel: int, parts: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s slice in the flattened parameter, clipped to ``numel``."""
    length = shard_length(numel, parts)
    return min(rank * length, numel), min((rank + 1) * length, numel)


def shard_parts(name: str, groups: ParallelGroups) -> int:
    """How many ranks share parameter ``name``'s optimizer state: ep_dp for stacked experts
    under expert parallelism, dp otherwise."""
    return shard_group(name, groups).size


def shard_group(name: str, groups: ParallelGroups) -> Group:
    if groups.ep.size > 1 and rule_for(name).kind == "expert":
        return groups.ep_dp
    return groups.dp


@dataclass(frozen=True)
class Slot:
    """One parameter's place in a bucket row."""

    index: int  # position in the optimizer's parameter list
    numel: int
    length: int  # elements per rank (L)
    offset: int  # where its L elements start in the bucket row


def plan_buckets(numels: list[int], parts: int, bucket_bytes: int) -> list[list[Slot]]:
    """Consecutive parameters grouped into buckets of about ``bucket_bytes`` fp32 bytes (padded)."""
    lengths = [shard_length(n, parts) for n in numels]
    out = []
    for bucket in buckets_by_size([4 * parts * L for L in lengths], bucket_bytes):
        offset, slots = 0, []
        for i in bucket:
            slots.append(Slot(i, numels[i], lengths[i], offset))
            offset += lengths[i]
        out.append(slots)
    return out


def pack_rows(tensors, slots: list[Slot], parts: int) -> Tensor:
    """(parts, sum L): row r holds rank r's slice of each tensor (flattened, zero-padded)."""
    columns = []
    for slot, t in zip(slots, tensors):
        flat = t.reshape(-1).astype(ms.float32)
        pad = parts * slot.length - slot.numel
        if pad:
            flat = ops.cat((flat, ops.zeros((pad,), ms.float32)))
        columns.append(flat.reshape(parts, slot.length))
    return columns[0] if len(columns) == 1 else ops.cat(columns, 1)


def unpack_rows(rows: Tensor, slots: list[Slot], shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Inverse of :func:`pack_rows`: the full tensors (padding dropped) from all rows."""
    out = []
    for slot, shape in zip(slots, shapes):
        flat = rows[:, slot.offset:slot.offset + slot.length].reshape(-1)  # (parts * L,)
        out.append(flat[:slot.numel].reshape(shape))
    return out


def _without_data_parallel(groups: ParallelGroups) -> ParallelGroups:
    """The same groups with dp and ep_dp reduced to this rank alone (GradientSync then only sums
    over cp and the sequence-parallel tp partials)."""
    alone = Group("", (groups.global_rank,), 0)
    return dataclasses.replace(groups, dp=alone, ep_dp=alone)


def parse_params(params, weight_decay: float, decay=None):
    """(parameters, weight decay of each) following ``nn.AdamWeightDecay``'s conventions.

    ``params``: a list of Parameters (each decays unless 'beta' or 'gamma' is in its name, or as
    ``decay`` [one bool per parameter] says), or MindSpore's groups: dicts with 'params' and an
    optional 'weight_decay' (a group decays iff its weight_decay > 0), plus optionally one
    ``{'order_params': [...]}`` fixing the order in which gradients arrive.
    """
    params = list(params)
    if not params or not isinstance(params[0], dict):
        if decay is None:
            decay = ['beta' not in p.name and 'gamma' not in p.name for p in params]
        if len(decay) != len(params):
            raise ValueError(f"ZeroAdamW: {len(decay)} decay flags for {len(params)} parameters")
        return params, [float(weight_decay) if d else 0.0 for d in decay]
    if decay is not None:
        raise ValueError("ZeroAdamW: pass weight decay per group or as `decay`, not both")
    found, order = [], None
    for group in params:
        unknown = set(group) - {"params", "weight_decay", "order_params"}
        if unknown:
            raise ValueError(f"ZeroAdamW: unsupported parameter-group key(s) {sorted(unknown)} (supported: "
                             "params, weight_decay, order_params; one learning rate for all groups)")
        if "order_params" in group:
            order = list(group["order_params"])
            continue
        wd = float(group.get("weight_decay", weight_decay))
        found += [(p, wd) for p in group["params"]]
    names = [p.name for p, _ in found]
    if len(set(names)) != len(names):
        raise ValueError("ZeroAdamW: a parameter appears in two groups")
    if order is not None:
        by_name = dict((p.name, (p, wd)) for p, wd in found)
        if sorted(p.name for p in order) != sorted(names):
            raise ValueError("ZeroAdamW: 'order_params' must hold exactly the grouped parameters")
        found = [by_name[p.name] for p in order]
    return [p for p, _ in found], [wd for _, wd in found]


class ZeroAdamW(nn.Cell):
    """AdamW with master weights and moments sharded over the data-parallel ranks (ZeRO-1).

    ``opt(grads, lr=None)``: one step from this rank's (unsynchronised, or with ``grads_synced``
    summed) gradients, in parameter order; every rank ends with the same full parameters.
    The trainer's split form (:class:`mindport.train.optim.Optimizer`): ``shards = opt.reduce_grads(grads)``, a rescale of the shards
    (clipping, loss scale; the norm from :class:`mindport.parallel.grad_sync.GradNorm`), then
    ``opt.update(shards, lr)``. ``lr`` (a scalar Tensor) overrides the fixed ``learning_rate``.

    ``masters``: optional fp32 tensors (one per parameter) to seed the master slices from, when the
    model's parameters are low precision (O2) and a full-precision copy exists at start.
    """

    sharded_state = True

    def __init__(self, params, groups: ParallelGroups, learning_rate: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0, *, decay=None,
                 bias_correction: bool = False, grads_synced: bool = False, masters=None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__()
        params, wds = parse_params(params, weight_decay, decay)
        if not params:
            raise ValueError("ZeroAdamW: no parameters")
        if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0 or not eps > 0:
            raise ValueError(f"ZeroAdamW: beta1 = {beta1}, beta2 = {beta2}, eps = {eps}: expected betas in [0, 1) "
                             "and eps > 0")
        self.params = ParameterTuple(params)
        self.shapes = [tuple(p.shape) for p in params]
        self.grads_synced, self.bias_correction = grads_synced, bias_correction
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.learning_rate = Tensor(learning_rate, ms.float32)
        self.betas = (Tensor(beta1, ms.float32), Tensor(beta2, ms.float32))
        self.eps_t, self.zero = Tensor(eps, ms.float32), Tensor(0.0, ms.float32)
        self.wd = [Tensor(wd, ms.float32) if wd else None for wd in wds]
        self.step = Parameter(Tensor(0.0, ms.float32), name="zero.step")  # completed updates

        # (collectives, rank, parts, buckets) per replica group: dense weights over dp, experts over ep_dp
        self.plans = []
        slot_of: dict[int, Slot] = {}
        rank_of: dict[int, int] = {}
        by_group: dict[Group, list[int]] = {}
        for i, p in enumerate(params):
            by_group.setdefault(shard_group(p.name, groups), []).append(i)
        for group, members in by_group.items():
            buckets = plan_buckets([int(params[i].size) for i in members], group.size, bucket_bytes)
            buckets = [[dataclasses.replace(s, index=members[s.index]) for s in b] for b in buckets]
            self.plans.append((collectives(group), group.rank, group.size, buckets))
            for bucket in buckets:
                for slot in bucket:
                    slot_of[slot.index] = slot
                    rank_of[slot.index] = group.rank
        self.slots = [slot_of[i] for i in range(len(params))]
        self.parts = [shard_parts(p.name, groups) for p in params]
        self.shard_groups = [shard_group(p.name, groups) for p in params]
        self.ranks = [rank_of[i] for i in range(len(params))]
        self.full_masters = (None,) * len(params)  # the masters are sliced: see master_weights()

        seeds = list(masters) if masters is not None else [None] * len(params)
        if len(seeds) != len(params):
            raise ValueError(f"ZeroAdamW: {len(seeds)} masters for {len(params)} parameters")
        master, m, v = [], [], []
        for i, p in enumerate(params):
            full = seeds[i] if seeds[i] is not None else p
            if tuple(full.shape) != self.shapes[i]:
                raise ValueError(f"ZeroAdamW: master for '{p.name}' has shape {tuple(full.shape)}, expected "
                                 f"{self.shapes[i]}")
            piece = self._my_slice(i, full.astype(ms.float32).asnumpy())
            master.append(Parameter(Tensor(piece), name=f"zero_master.{p.name}", requires_grad=False))
            m.append(Parameter(Tensor(np.zeros_like(piece)), name=f"zero_m.{p.name}", requires_grad=False))
            v.append(Parameter(Tensor(np.zeros_like(piece)), name=f"zero_v.{p.name}", requires_grad=False))
        self.master, self.moments1, self.moments2 = ParameterTuple(master), ParameterTuple(m), ParameterTuple(v)
        self.sync = None if grads_synced else GradientSync(params, _without_data_parallel(groups), bucket_bytes)

    def _my_slice(self, i: int, full: np.ndarray) -> np.ndarray:
        """This rank's L elements (zero-padded) of parameter i's full fp32 values."""
        start, stop = shard_range(self.slots[i].numel, self.parts[i], self.ranks[i])
        piece = np.zeros(self.slots[i].length, np.float32)
        piece[:stop - start] = full.reshape(-1)[start:stop]
        return piece

    # ------------------------------------------------------------------ the step
    def reduce_grads(self, grads) -> tuple:
        """This rank's slices (fp32, L elements each) of the gradients summed over the replicas."""
        grads = tuple(g.astype(ms.float32) for g in grads)
        if self.sync is not None:
            grads = self.sync(grads)
        out = [None] * len(grads)
        for comm, rank, parts, buckets in self.plans:
            for bucket in buckets:
                if self.grads_synced or parts == 1:
                    for slot in bucket:  # already summed: cut out this rank's slice
                        flat = grads[slot.index].reshape(-1)
                        start, stop = shard_range(slot.numel, parts, rank)
                        piece = flat[start:stop]
                        if stop - start < slot.length:
                            piece = ops.cat((piece, ops.zeros((slot.length - (stop - start),), ms.float32)))
                        out[slot.index] = piece
                else:
                    rows = pack_rows([grads[s.index] for s in bucket], bucket, parts)  # (parts, sum L)
                    mine = comm.reduce_scatter(rows, 0).reshape(-1)  # (sum L,): row `rank` of the sum
                    for slot in bucket:
                        out[slot.index] = mine[slot.offset:slot.offset + slot.length]
        return tuple(out)

    def update(self, shards, lr=None):
        """AdamW on this rank's slices, then every parameter gathered from the owners' slices."""
        lr = self.learning_rate if lr is None else lr.astype(ms.float32)
        t = self.step + 1.0
        ops.assign(self.step, t)
        if self.bias_correction:  # torch's AdamW (see mindport.train.optim)
            powers, eps = bias_correction(t, self.beta1, self.beta2, self.eps)
        else:  # nn.AdamWeightDecay: no bias correction
            powers, eps = (self.zero, self.zero), self.eps_t
        done = True
        for i in range(len(self.params)):
            out = adamw_step(self.master[i], self.moments1[i], self.moments2[i], shards[i], lr, self.wd[i], powers,
                             self.betas, eps)
            done = ops.depend(done, out)
        for comm, _, parts, buckets in self.plans:
            for bucket in buckets:
                row = ops.cat([ops.depend(self.master[s.index], done) for s in bucket])  # (sum L,)
                everyone = comm.all_gather(row.reshape(1, -1), 0)  # (parts, sum L)
                fulls = unpack_rows(everyone, bucket, [self.shapes[s.index] for s in bucket])
                for slot, full in zip(bucket, fulls):
                    param = self.params[slot.index]
                    done = ops.depend(done, ops.assign(param, full.astype(param.dtype)))
        return done

    def construct(self, grads, lr=None):
        return self.update(self.reduce_grads(grads), lr)

    # ------------------------------------------------------------------ state
    def gather(self, which: str = "master") -> list[Tensor]:
        """The full fp32 tensors of one state ('master', 'm' or 'v'), assembled from every rank's
        slices (a collective: every rank of each shard group must call it)."""
        state = {"master": self.master, "m": self.moments1, "v": self.moments2}[which]
        out = [None] * len(self.params)
        for comm, _, _, buckets in self.plans:
            for bucket in buckets:
                row = ops.cat([state[s.index] for s in bucket]).reshape(1, -1)
                fulls = unpack_rows(comm.all_gather(row, 0), bucket, [self.shapes[s.index] for s in bucket])
                for slot, full in zip(bucket, fulls):
                    out[slot.index] = full
        return out

    def master_weights(self) -> list[Tensor]:
        """The full fp32 weights: the parameters when all are fp32 (each update writes them from the
        masters), else gathered from the master slices (a collective)."""
        if all(p.dtype == ms.float32 for p in self.params):
            return list(self.params)
        return self.gather("master")

    def load_weights(self, arrays) -> None:
        """Set every parameter and this rank's master slices from full fp32 arrays."""
        for i, (param, array) in enumerate(zip(self.params, arrays)):
            param.set_data(Tensor(array).astype(param.dtype))
            self.master[i].set_data(Tensor(self._my_slice(i, np.asarray(array, np.float32))))

    def state_tensors(self, names) -> dict[str, Parameter]:
        """This rank's slices and the step, keyed by model parameter name."""
        out = {"zero.step": self.step}
        for name, w, m, v in zip(names, self.master, self.moments1, self.moments2):
            out.update({f"zero_master.{name}": w, f"zero_m.{name}": m, f"zero_v.{name}": v})
        return out

    def state_bytes(self) -> int:
        """Bytes this rank holds for the optimizer state (master, m, v slices)."""
        return 3 * 4 * sum(s.length for s in self.slots)
