"""HTTP routes of the A/B router: `POST /v1/feedback` (inference key) and the experiment
commands under `/admin/experiments` (admin key). Thin: `server.ab.operations` and the runtime
do the work, in worker threads where they touch the database.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from registry.service import Registry
from server.ab import operations
from server.ab.runtime import ABRuntime
from server.admin import get_registry, require_admin_key
from server.api import StateDep, require_inference_key
from server.errors import InvalidRequestError, ResourceNotFoundError

router = APIRouter()
RegistryDep = Annotated[Registry, Depends(get_registry)]
ActorDep = Annotated[str, Depends(require_admin_key)]


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=64)
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)


def _runtime(state) -> ABRuntime:
    runtime = getattr(state.resolver, "experiments", None)
    if runtime is None:
        raise ResourceNotFoundError(
            "This server runs no A/B experiments (it has no registry), so there is nothing to rate."
        )
    return runtime


@router.post("/v1/feedback", dependencies=[Depends(require_inference_key)])
async def feedback(body: FeedbackBody, state: StateDep) -> dict:
    """Rate a completion served inside an experiment; joins to the variant that served it on
    any replica. A second rating of the same completion changes nothing (the first stands)."""
    rating = await _runtime(state).rate(body.completion_id, body.score)
    return {
        "object": "feedback",
        "completion_id": rating.completion_id,
        "score": rating.score,
        "duplicate": rating.duplicate,
        "analysed": rating.analysed,
        "experiment": rating.experiment_id,
        "variant": rating.variant,
        "model": f"{rating.name}@{rating.version}",
    }


class StartBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    control: int | None = None
    candidate: int | None = None
    variants: dict[int, float] | None = Field(
        default=None, description="version -> weight (a static split; the first is the control)"
    )
    ramp: list[float] | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""


class StopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    promote: int | None = None
    rollback: bool = False
    reason: str = ""


def _plan_error(e: operations.PlanError) -> InvalidRequestError:
    return InvalidRequestError(str(e))


@router.post("/admin/experiments", status_code=201)
async def start_experiment(body: StartBody, registry: RegistryDep, actor: ActorDep) -> dict:
    try:
        record = await run_in_threadpool(
            lambda: operations.start(
                registry.store.experiments, body.name, control=body.control,
                candidate=body.candidate, variants=list((body.variants or {}).items()),
                ramp=body.ramp, config=body.config, actor=actor, reason=body.reason,
            )
        )  # fmt: skip
    except operations.PlanError as e:
        raise _plan_error(e) from e
    return record.to_json()


@router.get("/admin/experiments")
async def list_experiments(
    registry: RegistryDep,
    _: ActorDep,
    name: str | None = None,
    running: Annotated[bool, Query(description="only running ones")] = False,
) -> list[dict]:
    records = await run_in_threadpool(
        lambda: registry.store.experiments.list(name=name, running_only=running)
    )
    return [{k: v for k, v in r.to_json().items() if k != "analysis"} for r in records]


@router.get("/admin/experiments/{name}")
async def experiment_status(name: str, registry: RegistryDep, _: ActorDep) -> dict:
    return await run_in_threadpool(operations.status, registry.store.experiments, name)


@router.post("/admin/experiments/{name}/stop")
async def stop_experiment(
    name: str, body: StopBody, registry: RegistryDep, actor: ActorDep
) -> dict:
    try:
        record, move = await run_in_threadpool(
            lambda: operations.stop(
                registry.store.experiments, name, promote=body.promote,
                rollback=body.rollback, actor=actor, reason=body.reason,
            )
        )  # fmt: skip
    except operations.PlanError as e:
        raise _plan_error(e) from e
    out = {k: v for k, v in record.to_json().items() if k != "analysis"}
    out["alias_event"] = move.to_json() if move is not None else None
    return out
