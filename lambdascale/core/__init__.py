"""The serving core: queues, dispatch, units (full instances and λPipe pipelines), scale-outs and
memory plans on a cluster of node agents, written once.

    core.py       ServingCore: submit/abort, the controller's actuator, units and their workers
    scaleout.py   ScaleOut: one ScalePlan executed (local loads, multicast, execute-while-load,
                  lending, dissolution with KV shipped or recomputed, lost nodes)
    dissolve.py   a pipeline's end: each request's KV shipped to a full instance, or recomputed
    dispatch.py   late-binding dispatch of a queue onto units (the control plane's pure policy)
    memory.py     per-node holdings from the agents' reports; memory plans applied on agents
    snapshot.py   the control plane's ClusterSnapshot of the core
    state.py      Request, Unit, Deployment, CoreSettings (from the config tree), CoreStats

The gateway (``serve/cluster_backend.py``) and ``lambdascale bench scale`` (``bench/burst.py``)
are adapters over it.
"""
