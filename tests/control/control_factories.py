"""Small builders and hypothesis strategies for control-plane tests (tiny numbers, readable defaults)."""

from __future__ import annotations

from hypothesis import strategies as st

from lambdascale.control import (
    ClusterSnapshot,
    DeploymentSpec,
    Holding,
    InstanceState,
    InstanceView,
    ModelView,
    NodeView,
    Stage,
    Tier,
)

GB = 1 << 30
N_BLOCKS = 4


def node(
    nid: int,
    gpus: int = 1,
    free: int | None = None,
    host_gb: int = 100,
    host_free_gb: int | None = None,
    ssd_gb: int = 0,
    ssd_free_gb: int | None = None,
    holdings: tuple[Holding, ...] = (),
) -> NodeView:
    return NodeView(
        id=nid,
        gpus_total=gpus,
        gpus_free=gpus if free is None else free,
        host_bytes_total=host_gb * GB,
        host_bytes_free=(host_gb if host_free_gb is None else host_free_gb) * GB,
        ssd_bytes_total=ssd_gb * GB,
        ssd_bytes_free=(ssd_gb if ssd_free_gb is None else ssd_free_gb) * GB,
        holdings=holdings,
    )


def hold(model: str, tier: Tier, gb: int = 10, last_used: float = 0.0, **kw: object) -> Holding:
    return Holding(model, tier, gb * GB, last_used=last_used, **kw)  # type: ignore[arg-type]


def inst(
    iid: str,
    model: str = "m",
    nodes: tuple[int, ...] = (0,),
    state: InstanceState = InstanceState.FULL,
    capacity: int = 4,
    busy: int = 0,
    tokens: int = 0,
) -> InstanceView:
    """An instance with one stage per node, blocks dealt evenly (a pipeline when several nodes)."""
    k = len(nodes)
    bounds = [round(i * N_BLOCKS / k) for i in range(k + 1)]
    stages = tuple(Stage(n, bounds[i], bounds[i + 1]) for i, n in enumerate(nodes))
    return InstanceView(iid, model, state, stages, capacity=capacity, outstanding_requests=busy, outstanding_tokens=tokens)


def model(
    name: str = "m",
    instances: tuple[InstanceView, ...] = (),
    size_gb: int = 10,
    **kw: object,
) -> ModelView:
    spec = kw.pop("spec", DeploymentSpec())
    return ModelView(name=name, spec=spec, size_bytes=size_gb * GB, n_blocks=N_BLOCKS, instances=instances, **kw)  # type: ignore[arg-type]


def snap(nodes: tuple[NodeView, ...], models: tuple[ModelView, ...]) -> ClusterSnapshot:
    return ClusterSnapshot(nodes=nodes, models=models)


# ---- hypothesis strategies -------------------------------------------------------------------

specs = st.builds(
    lambda lo, span, tc, ka, s2z, tiers: DeploymentSpec(
        min_instances=lo, max_instances=max(lo + span, 0 if s2z else 1), target_concurrency=tc, keep_alive_s=ka,
        scale_to_zero=s2z, cache_tiers=tuple(tiers),
    ),
    st.integers(0, 3),
    st.integers(0, 6),
    st.integers(1, 8),
    st.sampled_from([0.0, 5.0, 60.0]),
    st.booleans(),
    st.lists(st.sampled_from([Tier.GPU, Tier.HOST, Tier.SSD]), unique=True, max_size=3),
)

tiers = st.sampled_from([Tier.GPU, Tier.HOST, Tier.SSD])


@st.composite
def clusters(draw: st.DrawFn, n_models: int = 2) -> ClusterSnapshot:
    """Random but valid clusters: up to 6 nodes, up to ``n_models`` models, holdings and instances."""
    n_nodes = draw(st.integers(1, 6))
    names = [f"m{i}" for i in range(draw(st.integers(1, n_models)))]
    sizes = {nm: draw(st.integers(1, 30)) for nm in names}
    gpus_total = {i: draw(st.integers(1, 2)) for i in range(n_nodes)}
    used = {i: 0 for i in range(n_nodes)}
    models = []
    for nm in names:
        insts = []
        for k in range(draw(st.integers(0, 3))):
            candidates = [i for i in range(n_nodes) if used[i] < gpus_total[i]]
            if not candidates:
                break
            nd = draw(st.sampled_from(candidates))
            used[nd] += 1
            state = draw(st.sampled_from([InstanceState.LOADING, InstanceState.FULL, InstanceState.DRAINING]))
            cap = draw(st.integers(1, 4))
            insts.append(inst(f"{nm}-i{k}", nm, (nd,), state, capacity=cap, busy=draw(st.integers(0, cap))))
        models.append(
            model(
                nm,
                tuple(insts),
                size_gb=sizes[nm],
                spec=draw(specs),
                queue_len=draw(st.integers(0, 20)),
                in_flight=draw(st.integers(0, 20)),
                last_request_at=draw(st.one_of(st.none(), st.floats(0, 100))),
                last_scale_at=draw(st.one_of(st.none(), st.floats(0, 100))),
            )
        )
    nodes = []
    for i in range(n_nodes):
        hs = []
        for nm in names:
            for t in (Tier.GPU, Tier.HOST, Tier.SSD):
                if draw(st.integers(0, 3)) == 0:
                    partial = draw(st.integers(0, 5)) == 0
                    hs.append(
                        Holding(
                            nm, t, sizes[nm] * GB, last_used=draw(st.floats(0, 100)),
                            blocks=frozenset({0}) if partial else None,
                        )
                    )
        host_gb = draw(st.integers(0, 80))
        ssd_gb = draw(st.integers(0, 80))
        host_used = sum(h.nbytes for h in hs if h.tier is Tier.HOST)
        ssd_used = sum(h.nbytes for h in hs if h.tier is Tier.SSD)
        host_total = max(host_gb * GB, host_used)
        ssd_total = max(ssd_gb * GB, ssd_used)
        nodes.append(
            NodeView(
                id=i,
                gpus_total=gpus_total[i],
                gpus_free=gpus_total[i] - used[i],
                host_bytes_total=host_total,
                host_bytes_free=host_total - host_used,
                ssd_bytes_total=ssd_total,
                ssd_bytes_free=ssd_total - ssd_used,
                holdings=tuple(hs),
            )
        )
    return ClusterSnapshot(nodes=tuple(nodes), models=tuple(models))
