"""OpenAI request bodies as pydantic models: the validated edge of the HTTP API.

Field names, defaults and ranges follow OpenAI's published API description (`null` for a field
it marks nullable means that field's default); vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, ...) are accepted too. Fields a self-hosted text model cannot
honour and that change nothing in its answer (`store`, `metadata`, `service_tier`,
`parallel_tool_calls`, `modalities`, `prediction`, ...) are ignored, as vLLM ignores them; a field
that would change the answer and is not implemented is refused with a 400 naming it. Every list a
client controls is bounded. Responses are built in `server.openai_service` and `server.streams`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_MESSAGES = 1024
MAX_PROMPTS = 128
MAX_CHOICES = 128  # OpenAI's maximum `n`; also the cap on prompts x n of one completion request
MAX_STOP = 4  # OpenAI: "Up to 4 sequences"
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_LIMIT = 100.0  # OpenAI: "values between -100 and 100"
# What a client may pass to the chat template. The template is the operator's: a client's own
# template (`chat_template`) or tool definitions smuggled past `tools` are refused, as vLLM refuses
# them without --trust-request-chat-template. These are the switches that reasoning models'
# templates read (Qwen3 and SmolLM3 `enable_thinking`, Granite and DeepSeek `thinking`); a
# template that does not read one ignores it, as Jinja ignores unknown variables.
CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking"})
# OpenAI's documented default prompt; an empty prompt means the same (start of a document).
DEFAULT_PROMPT = "<|endoftext|>"
INT64 = 2**63
# Token ids a client sends; the engine checks them against its vocabulary.
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's own server and vLLM do; clients send many.
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI marks most optional fields nullable: `null` there asks for the default."""
        if not isinstance(data, dict):
            return data
        optional = set()
        for name, info in cls.model_fields.items():
            if not info.is_required():
                optional.update({name, info.alias or name})
        return {k: v for k, v in data.items() if v is not None or k not in optional}


class StreamOptions(_Request):
    include_usage: bool = False
    # vLLM's extension: usage (so far) on every chunk, not only on the last one.
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Request):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is json_schema")
        return self


class _Sampling(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    user: str | None = None  # OpenAI's end-user id: the sticky key of A/B experiments
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    # 0 (OpenAI: only the most likely token) is sent to the engine as a tiny positive value.
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_bounded(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stop)}")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_bounded(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        keys = [k for k in bias if not _is_int(k)]
        if keys:
            raise ValueError(f"keys must be token ids (integers >= 0), got {keys[:3]}")
        values = [v for v in bias.values() if not -LOGIT_BIAS_LIMIT <= v <= LOGIT_BIAS_LIMIT]
        if values:
            raise ValueError(f"values must lie in [-100, 100], got {values[:3]}")
        return bias

    def stop_list(self) -> tuple[str, ...]:
        """Stop strings; an empty one would stop before the first token, so it is dropped."""
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)

    def token_bias(self) -> dict[int, float] | None:
        return {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    # Passed to the chat template, as vLLM does; a template that has no use for it (the embedded
    # SmolLM2's ChatML) renders the same prompt with or without it.
    name: str | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are rejected by the caller. A
        refusal part (an earlier assistant turn) is text too, as vLLM reads it."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", part.get("refusal", ""))) for part in self.content)

    def non_text_parts(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [str(p.get("type")) for p in self.content if p.get("type") not in _TEXT_PARTS]

    def template_input(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        return message


def _is_int(text: str) -> bool:
    try:
        return 0 <= int(text) < 2**31
    except ValueError:
        return False


_TEXT_PARTS = ("text", "refusal")
_NO_TOOL = (None, "none")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None  # the deprecated form of tools
    function_call: Any = None
    # vLLM extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _allowed_kwargs(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        if not kwargs:
            return None
        refused = sorted(k for k in kwargs if k not in CHAT_TEMPLATE_KWARGS)
        if refused:
            raise ValueError(
                f"{refused} may not be set by a request; allowed: {sorted(CHAT_TEMPLATE_KWARGS)} "
                "(add_generation_prompt and continue_final_message are top-level fields)"
            )
        bad = sorted(k for k, v in kwargs.items() if not isinstance(v, bool | int | float | str))
        if bad:
            raise ValueError(f"{bad} must be a boolean, number or string")
        return kwargs

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        # As OpenAI and vLLM answer: "none" needs nothing, anything else asks for a tool call.
        if choice not in _NO_TOOL and not info.data.get("tools"):
            raise ValueError("tool_choice other than 'none' is only allowed when tools are given")
        return choice

    @field_validator("function_call")
    @classmethod
    def _function_call_needs_functions(cls, call: Any, info: ValidationInfo) -> Any:
        if call not in _NO_TOOL and not info.data.get("functions"):
            raise ValueError("function_call other than 'none' is only allowed with functions")
        return call

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    # 0 is allowed with echo: the answer is the prompt itself (scoring use), as OpenAI allows.
    max_tokens: int = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    # The prompt is prepended to each choice's text, as OpenAI does.
    echo: bool = False
    best_of: int | None = Field(default=None, ge=0)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_ids_in_range(cls, prompt: Any) -> Any:
        """One clear message for token ids no vocabulary has, instead of one per union arm."""
        if isinstance(prompt, list):
            ids = [x for x in prompt if isinstance(x, int)]
            ids += [x for p in prompt if isinstance(p, list) for x in p if isinstance(x, int)]
            bad = [x for x in ids if not 0 <= x < 2**31]
            if bad:
                raise ValueError(f"token ids are integers from 0 to 2**31 - 1, got {bad[:3]}")
        return prompt

    @model_validator(mode="before")
    @classmethod
    def _null_prompt(cls, data: Any) -> Any:
        # OpenAI: prompt is nullable, defaulting to the document separator.
        if isinstance(data, dict) and "prompt" in data and data["prompt"] is None:
            return {**data, "prompt": DEFAULT_PROMPT}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        problems = []
        if self.best_of is not None and self.best_of != self.n:
            problems.append("best_of other than n is not supported; leave it unset")
        if self.suffix:
            problems.append("suffix (insertion) is not supported by this model")
        count = len(self.prompts())
        if count == 0:
            problems.append("prompt must not be an empty list")
        elif count > MAX_PROMPTS:
            problems.append(f"prompt holds {count} prompts; at most {MAX_PROMPTS} are served")
        elif count * self.n > MAX_CHOICES:
            problems.append(f"{count} prompts x n={self.n} is over {MAX_CHOICES} choices")
        if self.echo and self.logprobs is not None:
            problems.append("echo with logprobs is not supported (no prompt logprobs are kept)")
        if self.echo and any(not isinstance(p, str) for p in self.prompts()):
            problems.append("echo needs text prompts, not token ids")
        if self.max_tokens == 0 and not self.echo:
            problems.append("max_tokens 0 is only meaningful with echo")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt field normalised to a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)
