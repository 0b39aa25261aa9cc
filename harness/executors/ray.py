"""Sweeps on a Ray cluster: one task per cell, whole-device meters exclusive per node, the driver writes.

The only module that imports Ray (lazily: ``pip install 'un0-bench[ray]'``).

- **Resources.** A CPU cell asks for ``cpus_per_cell`` CPUs (torch uses that many threads); a cell
  on a CUDA backbone asks for one GPU, which Ray gives it alone.
- **Isolation.** A meter that sees a whole device (``rapl``, ``codecarbon``: the CPU package, and
  anything else with ``sees_whole_device`` except ``nvml``, which sees only the cell's own GPU)
  reads the joules of everything on that node. Every node offers one unit of the custom resource
  :data:`DEVICE_RESOURCE`; a cell with such a meter takes the whole unit, a cell metered only by
  ``proxy`` and ``wall`` takes :data:`SHARED_SHARE` of it. So two whole-device cells never run on one
  node at the same time, and none runs beside a shared cell, while shared cells run side by side.
  Every record still says what else had windows open on its node meanwhile (``device_shared_with``).
- **One writer.** Workers return :class:`~un0_bench.harness.running.cell.CellResult` s; the driver's
  :class:`~un0_bench.harness.running.runner.Runner` alone appends them.
- **Mixed nodes.** Before any cell, one small task per node reports its un0-bench version, git
  commit and the digests of the backbone's weights files; nodes that differ are refused, listing the
  differences (``allow_mixed``: run anyway and record them in every record as ``mixed_nodes``).
- **Faults.** A cell whose worker died (killed, out of memory, node lost) is submitted again, on
  another node where there is one, up to ``retries`` times, then recorded as failed with the reason.
  An error raised by the cell itself (the generator, a meter) is recorded as failed at once.
"""

from __future__ import annotations

import os
import socket
import time
from importlib import metadata
from typing import Any

from un0_bench.harness.core.spec import ModelSpec
from un0_bench.harness.errors import UserError
from un0_bench.harness.executors import Executor, OnEvent, OnResult
from un0_bench.harness.running.cell import BenchSpec, Cell, CellResult, Placement, Workbench
from un0_bench.harness.running.config import DEFAULT_CELL_CPUS, DEFAULT_CELL_RETRIES

#: The custom resource every node offers one unit of: the right to meter its whole devices.
DEVICE_RESOURCE = "un0_device"
#: What a cell metered only by work-counting meters (proxy, wall) takes of it (at most 100 share a node).
SHARED_SHARE = 0.01
#: Whole-device meters that see only the cell's own GPU (exclusive already by its ``num_gpus=1``).
GPU_ONLY_METERS = frozenset({"nvml"})
#: Fields of a node's fingerprint that must agree across the cluster.
MUST_AGREE = ("un0-bench", "git_commit", "weights")

INSTALL_HINT = "pip install 'un0-bench[ray]' (or: pip install 'ray>=2.40,<3')"
HEAD_HINT = (f"ray start --head --resources='{{\"{DEVICE_RESOURCE}\": 1}}' on the head node and ray start "
             f"--address=HEAD:6379 --resources='{{\"{DEVICE_RESOURCE}\": 1}}' on each worker node")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def sees_whole_device(spec: BenchSpec, meter: str) -> bool:
    """Whether ``meter`` reads a whole device shared with other cells on the node (not only its own GPU)."""
    name = ModelSpec.parse(meter).name
    if name in GPU_ONLY_METERS:
        return False
    target = spec.meters.get(name)
    if isinstance(target, type):
        return bool(getattr(target, "sees_whole_device", False))
    made = target(**dict(ModelSpec.parse(meter).params))  # a factory: ask the meter it makes
    try:
        return bool(getattr(made, "sees_whole_device", False))
    finally:
        made.close()


#: A fingerprint's key for a model whose weights a node cannot open (its value says why).
WEIGHTS_UNREADABLE = "(cannot open its weights)"


def fingerprint(spec: BenchSpec) -> dict[str, Any]:
    """What must agree on every node: the un0-bench version and commit, the weights files the run's models load.

    The files are those the driver's pre-flight opens (:func:`~un0_bench.harness.core.stack.check_weights`),
    named and hashed the same way; a node whose file cannot be opened reports why in their place.
    """
    from un0_bench.harness.core.stack import resolve_checked
    from un0_bench.harness.errors import UserError
    from un0_bench.harness.measuring.environment import git_commit
    from un0_bench.harness.running.plan import load_backbone

    plan, sweep = spec.plan, spec.plan.config.sweep
    backbone = load_backbone(sweep.backbone, spec.backbones, **sweep.backbone_options)
    weights: dict[str, str] = {}
    for model in dict.fromkeys([*plan.models, plan.reference]):
        try:
            weights.update(resolve_checked(model, backbone, spec.generators, spec.techniques).weights())
        except UserError as e:
            weights[f"{model} {WEIGHTS_UNREADABLE}"] = str(e)
    try:
        version = metadata.version("un0-bench")
    except metadata.PackageNotFoundError:
        version = None
    return {"un0-bench": version, "git_commit": git_commit(), "weights": weights, "host": socket.gethostname()}


def unreadable(prints: dict[str, dict[str, Any]]) -> list[str]:
    """``node N: why`` for every weights file a node's fingerprint could not open (refused even when all agree)."""
    return [f"node {node[:12]}: {why}" for node, p in prints.items()
            for key, why in (p.get("weights") or {}).items() if key.endswith(WEIGHTS_UNREADABLE)]


def differences(prints: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{field: {node: value}}`` for each field of :data:`MUST_AGREE` that is not the same on every node."""
    out: dict[str, dict[str, Any]] = {}
    for key in MUST_AGREE:
        values = {node: p.get(key) for node, p in prints.items()}
        if len({repr(v) for v in values.values()}) > 1:
            if key == "weights":  # name only the files that differ
                names = sorted({n for v in values.values() for n in (v or {})})
                odd = [n for n in names if len({(v or {}).get(n) for v in values.values()}) > 1]
                values = {node: {n: (v or {}).get(n) for n in odd} for node, v in values.items()}
            out[key] = values
    return out


def mixed_message(prints: dict[str, dict[str, Any]], mixed: dict[str, dict[str, Any]]) -> str:
    """The refusal of a cluster whose nodes differ, naming each difference on each node."""
    listed = "; ".join(f"{key}: " + ", ".join(f"node {node[:12]} ({prints[node].get('host')}) {value}"
                                              for node, value in values.items())
                       for key, values in mixed.items())
    return (f"the cluster's nodes differ ({listed}); install the same un0-bench and weights on every node, or pass "
            f"--allow-mixed to run anyway (recorded in every record)")


class _CellLog:
    """A small actor: which cells run where, and which had metered windows open on one node together."""

    def __init__(self) -> None:
        self.running: dict[str, str] = {}  # cell label -> node id
        self.open: dict[str, tuple[str, set[str]]] = {}  # cell label -> (node, labels open beside it)

    def started(self, label: str, node: str) -> None:
        self.running[label] = node

    def windows_open(self, label: str, node: str) -> None:
        mine: set[str] = set()
        for other, (where, beside) in self.open.items():
            if where == node:
                beside.add(label)
                mine.add(other)
        self.open[label] = (node, mine)

    def windows_closed(self, label: str) -> list[str]:
        _, beside = self.open.pop(label, ("", set()))
        return sorted(beside)

    def ended(self, label: str) -> str | None:
        """Forget a cell (finished, or its worker died); the node it ran on."""
        self.open.pop(label, None)
        return self.running.pop(label, None)

    def snapshot(self) -> dict[str, str]:
        return dict(self.running)


_ENVIRONMENT: dict[str, Any] = {}


def _node_environment() -> dict[str, Any]:
    """This worker's environment, found once per worker process (a git call and ten version look-ups)."""
    from un0_bench.harness.measuring.environment import environment

    if not _ENVIRONMENT:
        _ENVIRONMENT.update(environment())
    return dict(_ENVIRONMENT)


def _measure(spec: BenchSpec, cell: Cell, log: Any, cpus: int) -> CellResult:
    """The body of a cell's task, on a worker: a workbench of its own, idle measured inside the cell's slot."""
    import ray
    import torch

    node = ray.get_runtime_context().get_node_id()
    gpus = ray.get_gpu_ids()
    device = f"cuda:{gpus[0]}" if gpus else "cpu"
    ray.get(log.started.remote(cell.label, node))
    if not gpus:
        torch.set_num_threads(cpus)
    placement = Placement(executor="ray", node=node, device=device,
                          begin=lambda c: ray.get(log.windows_open.remote(c.label, node)),
                          shared_with=lambda c: ray.get(log.windows_closed.remote(c.label)))
    bench = Workbench(spec, environment=_node_environment(), placement=placement)
    try:
        bench.open()  # idle power of whole-device meters: inside this cell's exclusive slot
        return bench.measure(cell)
    except Exception as e:  # the cell's own error (generator, meter): recorded, not retried
        return CellResult(cell, [], failed=f"error in the cell on node {node[:12]}: {type(e).__name__}: {e}")
    finally:
        bench.close()


class RayExecutor(Executor):
    """One Ray task per cell on the cluster at ``address`` (``None``: ``RAY_ADDRESS``, or a local cluster).

    Args:
        address: A Ray address (``HOST:6379``, ``ray://HOST:10001``, ``auto``).
        retries: Times a cell whose worker died is tried again before it is recorded as failed.
        allow_mixed: Run even if nodes differ in un0-bench version or weights (recorded in every record).
        cpus_per_cell: CPUs (and torch threads) of a CPU cell.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, retries: int = DEFAULT_CELL_RETRIES, allow_mixed: bool = False,
                 cpus_per_cell: int = DEFAULT_CELL_CPUS, num_cpus: int | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus = num_cpus  # of a local cluster this executor starts (None: all the host's)
        self.retries, self.allow_mixed, self.cpus_per_cell = retries, allow_mixed, cpus_per_cell
        self.mixed: dict[str, dict[str, Any]] = {}
        self.prints: dict[str, dict[str, Any]] = {}
        self.started_cluster = False

    # --- pre-flight -----------------------------------------------------------------------------
    def connect(self) -> Any:
        ray = _ray()
        if not ray.is_initialized():
            if self.address is None:
                # No cluster named: a local one on this host, with the device resource on its one node.
                ray.init(num_cpus=self.num_cpus, resources={DEVICE_RESOURCE: 1}, include_dashboard=False,
                         logging_level="WARNING")
                self.started_cluster = True
            else:
                try:
                    ray.init(address=self.address, logging_level="WARNING")
                except (ConnectionError, RuntimeError) as e:
                    raise UserError(f"cannot connect to the Ray cluster at {self.address}: {e}") from None
        return ray

    def nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.connect().nodes() if n.get("Alive")]

    def check(self, spec: BenchSpec) -> None:
        """Refuse before any cell: no device resource on a node, or nodes that differ (unless allowed)."""
        ray = self.connect()
        nodes = self.nodes()
        lacking = [n["NodeID"][:12] for n in nodes if n.get("Resources", {}).get(DEVICE_RESOURCE, 0) < 1]
        if lacking:
            raise UserError(f"Ray nodes {', '.join(lacking)} offer no {DEVICE_RESOURCE!r} resource, which keeps "
                            f"whole-device meters exclusive per node; start them with {HEAD_HINT}")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0)(fingerprint)
        refs = {n["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(spec) for n in nodes}
        self.prints = dict(zip(refs, ray.get(list(refs.values())), strict=True))
        broken = unreadable(self.prints)
        if broken:
            raise UserError("a node cannot open the weights the run loads: " + "; ".join(broken))
        self.mixed = differences(self.prints)
        if self.mixed and not self.allow_mixed:
            raise UserError(mixed_message(self.prints, self.mixed))

    # --- the sweep ------------------------------------------------------------------------------
    def resources(self, spec: BenchSpec, cell: Cell) -> dict[str, Any]:
        """What a cell's task asks Ray for: one GPU or its CPUs, and all or a share of its node's device unit."""
        cuda = str(spec.plan.config.sweep.backbone_options.get("device") or "cpu").startswith("cuda")
        whole = any(sees_whole_device(spec, m) for m in cell.meter_names)
        return {"num_cpus": 0 if cuda else self.cpus_per_cell, "num_gpus": 1 if cuda else 0,
                "resources": {DEVICE_RESOURCE: 1.0 if whole else SHARED_SHARE}}

    def run(self, spec: BenchSpec, cells: list[Cell], on_result: OnResult, on_event: OnEvent) -> None:
        ray = self.connect()
        from ray.exceptions import GetTimeoutError, RayError, RayTaskError, TaskCancelledError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        log = ray.remote(num_cpus=0)(_CellLog).remote()
        task = ray.remote(max_retries=0)(_measure)
        asks = {cell: self.resources(spec, cell) for cell in cells}
        pending: dict[Any, tuple[Cell, list[str]]] = {}
        shared_spec = ray.put(spec)  # pickled once for every task, not once per cell

        def submit(cell: Cell, lost_on: list[str]) -> None:
            options: dict[str, Any] = dict(asks[cell])
            others = [n["NodeID"] for n in self.nodes() if n["NodeID"] not in lost_on]
            if lost_on and others:  # try again elsewhere (soft: wherever there is room, if not there)
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(others[0], soft=True)
            pending[task.options(**options).remote(shared_spec, cell, log, self.cpus_per_cell)] = (cell, lost_on)

        for cell in cells:  # in the runner's order (seeded, shuffled)
            submit(cell, [])
        counts: dict[str, dict[str, int]] = {}

        def tally(node: str, what: str) -> None:
            counts.setdefault(node, {"done": 0, "failed": 0})[what] += 1

        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                try:
                    running = ray.get(log.snapshot.remote(), timeout=5)
                except GetTimeoutError:
                    running = {}
                on_event("progress", progress(counts, running, len(cells)))
                for ref in ready:
                    cell, lost_on = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except RayTaskError as e:  # raised by the task's own code outside the cell: not retried
                        result = CellResult(cell, [], failed=f"error in the task: {e.cause!r}")
                    except (TaskCancelledError, RayError) as e:  # the worker or its node is gone
                        node = ray.get(log.ended.remote(cell.label)) or "unknown node"
                        lost = [*lost_on, node]
                        reason = f"{type(e).__name__} on node {node[:12]}"
                        if len(lost) <= self.retries:
                            on_event("note", {"text": f"{cell.label}: worker lost ({reason}); trying again "
                                                      f"({len(lost)} of {self.retries})"})
                            submit(cell, lost)
                            continue
                        tally(node, "failed")
                        where = ", ".join(n[:12] for n in lost)
                        last = (str(e).strip().splitlines() or [""])[0]
                        on_result(CellResult(cell, [], failed=f"worker lost {len(lost)} times (nodes {where}); "
                                                              f"last: {type(e).__name__}: {last}"))
                        continue
                    node = ray.get(log.ended.remote(cell.label)) or "unknown node"
                    tally(result.records[0].get("node") if result.records else node,
                          "failed" if result.failed else "done")
                    if self.mixed:
                        result.records = [r.with_fields(mixed_nodes=self.mixed) for r in result.records]
                    on_result(result)
            on_event("progress", progress(counts, {}, len(cells)))
        except BaseException:
            for ref in pending:  # interrupted at the driver: what is finished is written; the rest stops
                ray.cancel(ref, force=True)
            raise
        finally:
            ray.kill(log)

    def shutdown(self) -> None:
        """Stop the local cluster this executor started (a cluster it connected to keeps running)."""
        if self.started_cluster:
            _ray().shutdown()
            self.started_cluster = False


def progress(counts: dict[str, dict[str, int]], running: dict[str, str], total: int) -> dict[str, Any]:
    """Cells done / running / failed, per node and in all (the CLI's progress bar)."""
    nodes: dict[str, dict[str, int]] = {n: {"done": c["done"], "running": 0, "failed": c["failed"]}
                                        for n, c in counts.items()}
    for node in running.values():
        nodes.setdefault(node, {"done": 0, "running": 0, "failed": 0})["running"] += 1
    return {"total": total, "nodes": nodes, "at": time.time(),
            **{k: sum(n[k] for n in nodes.values()) for k in ("done", "running", "failed")}}
