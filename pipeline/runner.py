"""The runner: turns stages (callables on batches + the resources they ask for) into Ray Data calls.

This and `jobs/` are the only code that imports Ray. A stage is a class with `__init__(**kwargs)`
that loads what it needs once per actor and `__call__(batch) -> batch`, where a batch is a dict of
numpy arrays sharing a leading dimension. The unit of work (an inversion chunk, a shard) is fixed
by the driver, not by Ray's block boundaries: each unit travels as one Ray row holding its batch
packed with `numpy.savez` (no pickle), so a unit is computed the same way on every run and resume.
`LocalRunner` runs the same stages in-process (tests, benchmarks' floor).
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from tailseed.pipeline.errors import UserError


class ResourceError(UserError):
    """A stage asks for more than the cluster has."""


@dataclass(frozen=True)
class Resources:
    """What each actor of a stage reserves. On CPU-only machines keep num_cpus fractional: actors
    that each hold a whole CPU starve Ray Data's read tasks on small machines."""

    num_actors: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    # Ray custom resources per actor, e.g. {"a100": 1}: only nodes started with them
    # (`ray start --resources`) take the stage's actors
    custom: dict[str, float] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.num_actors < 1:
            raise UserError(f"{where}.num_actors is {self.num_actors}; at least 1")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UserError(f"{where}.{name} is {value}; a number >= 0")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise UserError(f"{where}: num_cpus and num_gpus are both 0; give the stage some CPU")


@dataclass(frozen=True)
class Stage:
    name: str
    cls: type
    kwargs: dict = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)


_BYTES = "__bytes__"


def pack(batch: dict[str, np.ndarray]) -> bytes:
    """A batch -> bytes via `numpy.savez`. Columns of Python bytes (PNGs) are stored as one uint8
    buffer plus offsets, so that loading never needs pickle."""
    arrays = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.dtype == object:
            items = [bytes(v) for v in value]
            arrays[f"{_BYTES}{name}"] = np.frombuffer(b"".join(items), dtype=np.uint8)
            arrays[f"{_BYTES}offsets_{name}"] = np.cumsum(
                [0] + [len(v) for v in items], dtype=np.int64
            )
        else:
            arrays[name] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    out = {}
    for name, value in arrays.items():
        if name.startswith(f"{_BYTES}offsets_"):
            continue
        if name.startswith(_BYTES):
            col = name[len(_BYTES) :]
            offsets = arrays[f"{_BYTES}offsets_{col}"]
            raw = value.tobytes()
            out[col] = np.asarray(
                [raw[a:b] for a, b in zip(offsets[:-1], offsets[1:])] or [], dtype=object
            )
        else:
            out[name] = value
    return out


def _threads_for(num_cpus: float) -> int:
    return max(1, math.ceil(num_cpus))


class _UnitAdapter:
    """Runs one stage on whole units inside a Ray actor (or in-process)."""

    def __init__(self, stage_cls: type, stage_kwargs: dict, threads: int):
        self.threads = threads
        self._set_threads()
        self.stage = stage_cls(**stage_kwargs)
        self.node_id = _node_id()

    def _set_threads(self) -> None:
        """A fractional CPU reservation is bookkeeping only: bound torch's threads to it. Set per
        call, since in-process stages share one torch; never imported here, so that a stage
        without a model (the writer) stays a small process."""
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(self.threads)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._set_threads()
        out_units, out_payloads, seconds, nodes = [], [], [], []
        earlier_nodes = rows.get("node_id", [""] * len(rows["unit"]))
        earlier_seconds = rows.get("seconds", [0.0] * len(rows["unit"]))
        for unit, blob, node, spent in zip(
            rows["unit"], rows["payload"], earlier_nodes, earlier_seconds
        ):
            t0 = time.perf_counter()
            result = self.stage(unpack(bytes(blob)))
            seconds.append(float(spent) + time.perf_counter() - t0)
            nodes.append(f"{node},{self.node_id}" if node else self.node_id)
            out_units.append(int(unit))
            out_payloads.append(pack(result))
        return {
            "unit": np.asarray(out_units, dtype=np.int64),
            "payload": np.asarray(out_payloads, dtype=object),
            "node_id": np.asarray(nodes),
            "seconds": np.asarray(seconds, dtype=np.float64),
        }


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node id
        pass
    return "local"


@dataclass
class UnitResult:
    unit: int
    batch: dict[str, np.ndarray]
    node_id: str  # the nodes that ran the unit's stages, comma-separated
    seconds: float  # time inside the stages, summed


class LocalRunner:
    """Runs stages in this process, unit by unit: the same code path as Ray, minus Ray.

    Each stage gets the torch threads that its resources give it on Ray, so that both runners
    compute the same floating-point results.
    """

    def __init__(self):
        self._cache: dict[tuple, _UnitAdapter] = {}

    def node_ids(self) -> list[str]:
        return ["local"]

    def run(
        self, units: dict[int, dict[str, np.ndarray]], stages: list[Stage]
    ) -> Iterator[UnitResult]:
        adapters = []
        for stage in stages:
            key = (stage.cls, repr(sorted(stage.kwargs.items())))
            if key not in self._cache:
                self._cache[key] = _UnitAdapter(
                    stage.cls, stage.kwargs, _threads_for(stage.resources.num_cpus)
                )
            adapters.append(self._cache[key])
        for unit in sorted(units):
            rows = {
                "unit": np.asarray([unit]),
                "payload": np.asarray([pack(units[unit])], dtype=object),
            }
            for adapter in adapters:
                rows = adapter(rows)
            yield UnitResult(
                unit, unpack(bytes(rows["payload"][0])), "local", float(rows["seconds"][0])
            )

    def shutdown(self) -> None:
        self._cache.clear()


class RayRunner:
    """Ray Data execution: one fixed-size actor pool per stage, units streamed back as they finish."""

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        object_store_mb: int = 512,
        log: Callable[[str], None] = print,
    ):
        import ray

        self.log = log
        self.owns_ray = (
            not ray.is_initialized()
        )  # a Ray started here is stopped here, not a caller's
        if self.owns_ray:
            if address:
                log(f"connecting to the Ray cluster at {address}")
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                # "local": a private Ray of this run's own, even when another Ray (a user's, a
                # test's) runs on this machine, which plain ray.init() would try to join
                log(f"starting a private local Ray ({num_cpus or os.cpu_count()} CPUs)")
                ray.init(
                    address="local",
                    num_cpus=num_cpus or os.cpu_count(),
                    object_store_memory=object_store_mb * 1024**2,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)

    def node_ids(self) -> list[str]:
        import ray

        return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))

    def cluster_resources(self) -> dict:
        import ray

        return dict(ray.cluster_resources())

    def check_resources(self, stages: list[Stage]) -> None:
        """A stage whose actor pool can never be placed would wait forever: say so instead."""
        total = self.cluster_resources()
        for stage in stages:
            r = stage.resources
            asked = [("GPU", r.num_gpus), ("CPU", r.num_cpus), *sorted(r.custom.items())]
            for name, per_actor in asked:
                if per_actor <= 0:
                    continue
                need, have = per_actor * r.num_actors, float(total.get(name, 0.0))
                if need > have:
                    raise ResourceError(
                        f"{stage.name}.resources: {r.num_actors} actor(s) x {per_actor:g} {name} = "
                        f"{need:g} {name}, but the Ray cluster has {have:g}; lower num_actors or "
                        f"the amount per actor"
                    )

    def run(
        self, units: dict[int, dict[str, np.ndarray]], stages: list[Stage]
    ) -> Iterator[UnitResult]:
        import ray

        if not units:
            return
        self.check_resources(stages)
        free_before = self._free()
        items = [{"unit": u, "payload": pack(units[u])} for u in sorted(units)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        for stage in stages:
            r = stage.resources
            ds = ds.map_batches(
                _UnitAdapter,
                fn_constructor_kwargs={
                    "stage_cls": stage.cls,
                    "stage_kwargs": stage.kwargs,
                    "threads": _threads_for(r.num_cpus),
                },
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=r.num_actors),
                num_cpus=r.num_cpus,
                num_gpus=r.num_gpus,
                **({"resources": dict(r.custom)} if r.custom else {}),
            )
        for row in ds.iter_rows():
            yield UnitResult(
                int(row["unit"]),
                unpack(bytes(row["payload"])),
                str(row["node_id"]),
                float(row["seconds"]),
            )
        self._await_release(free_before)

    @staticmethod
    def _free() -> dict[str, float]:
        import ray

        free = ray.available_resources()
        return {name: float(free.get(name, 0.0)) for name in ("CPU", "GPU")}

    def _await_release(self, before: dict[str, float], timeout_s: float = 5.0) -> None:
        """Ray Data tears an execution's actor pools down asynchronously. The next execution's
        pools would otherwise start while the old actors still hold their models: two models in
        memory at once, and actors competing for the same CPUs. Wait until the resources that the
        pools held are free again, for at most `timeout_s` (other jobs may have taken them)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            free = self._free()
            if all(free[name] >= before[name] - 1e-6 for name in before):
                return
            time.sleep(0.05)

    def shutdown(self) -> None:
        import ray

        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
