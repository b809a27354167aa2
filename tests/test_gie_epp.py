"""/metrics as the Gateway API Inference Extension's endpoint picker (EPP) reads it, on the fake
engine (fast, HTTP layer); the real engine's turn is tests/test_engine_metrics.py.

`parse_exposition` and `epp_extract` re-implement in Python exactly what the EPP's Go code does
with the text of a scrape, so that a name, label or type it would not accept fails here:
- parsing: prometheus/common expfmt/text_parse.go (TextParser, as the EPP calls it with
  model.LegacyValidation from llm-d/llm-d-router @ ebab687927f5331c1b39defcb579a07951bce56c,
  pkg/epp/framework/plugins/datalayer/source/metrics/datasource.go, parseMetrics);
- extraction: the same llm-d-router commit, pkg/epp/framework/plugins/datalayer/extractor/
  metrics/{extractor.go,spec.go,loraspec.go,factories.go} (the "vllm" engine mapping).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client import CollectorRegistry

from server.engine_fake import FakeEngine
from server.engine_vllm import VllmEngine, VllmEngineSettings
from server.metrics import render_metrics
from tests.support.servers import wait_for

# factories.go, defaultEngineConfigs["vllm"]
EPP_QUEUE = "vllm:num_requests_waiting"
EPP_RUNNING = "vllm:num_requests_running"
EPP_KV_USAGE = "vllm:kv_cache_usage_perc"
EPP_LORA = "vllm:lora_requests_info"
EPP_CACHE_INFO = "vllm:cache_config_info"
EPP_FAMILIES = (EPP_QUEUE, EPP_RUNNING, EPP_KV_USAGE, EPP_LORA)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")  # model.LegacyValidation
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TYPES = {"counter", "gauge", "summary", "untyped", "histogram", "gaugehistogram"}


class ExpositionError(ValueError):
    """What expfmt's TextParser returns as ParseError: the EPP drops the whole scrape."""


@dataclass
class Sample:
    labels: list[tuple[str, str]]
    value: float
    timestamp_ms: int | None = None


@dataclass
class Family:
    name: str
    help: str | None = None
    type: str | None = None  # None until a TYPE line or a sample fixes it (then "untyped")
    metrics: list[Sample] = field(default_factory=list)


def _family_for(families: dict[str, Family], name: str) -> Family:
    """setOrCreateCurrentMF: _sum/_count/_bucket lines join a summary/histogram family."""
    if name in families:
        return families[name]
    for suffix, kinds in (("_count", ("summary", "histogram")), ("_sum", ("summary", "histogram")),
                          ("_bucket", ("histogram",))):  # fmt: skip
        base = name[: -len(suffix)] if name.endswith(suffix) else None
        if base and base in families and families[base].type in kinds:
            return families[base]
    families[name] = Family(name)
    return families[name]


def _parse_float(text: str) -> float:
    if any(c in text for c in "pP_"):  # parseFloat's extra rule
        raise ValueError(text)
    return float(text)


def _label_value(line: str, at: int, lineno: int) -> tuple[str, int]:
    """readTokenAsLabelValue: a quoted value with \\" \\\\ \\n escapes; returns (value, end)."""
    out, i = [], at
    while i < len(line):
        c = line[i]
        if c == "\\":
            nxt = line[i + 1 : i + 2]
            if nxt not in ('"', "\\", "n"):
                raise ExpositionError(f"line {lineno}: invalid escape sequence '\\{nxt}'")
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise ExpositionError(f"line {lineno}: label value {''.join(out)!r} is not closed")


def _skip_blanks(text: str, at: int) -> int:
    while text[at : at + 1] in (" ", "\t"):
        at += 1
    return at


def _parse_sample(families: dict[str, Family], line: str, lineno: int) -> None:
    match = _METRIC_NAME.match(line)
    if not match:
        raise ExpositionError(f"line {lineno}: invalid metric name")
    family = _family_for(families, match.group())
    family.type = family.type or "untyped"
    rest, labels = line[match.end() :].lstrip(" \t"), []
    if rest.startswith("{"):
        i = 1
        while True:
            i = _skip_blanks(rest, i)
            if rest[i : i + 1] == "}":
                i += 1
                break
            name = _LABEL_NAME.match(rest, i)
            if not name:
                raise ExpositionError(f"line {lineno}: invalid label name for {family.name!r}")
            if name.group() == "__name__":
                raise ExpositionError(f'line {lineno}: label name "__name__" is reserved')
            if any(key == name.group() for key, _ in labels):
                raise ExpositionError(f"line {lineno}: duplicate label names")
            i = _skip_blanks(rest, name.end())
            if rest[i : i + 1] != "=":
                raise ExpositionError(f"line {lineno}: expected '=' after label name")
            i = _skip_blanks(rest, i + 1)
            if rest[i : i + 1] != '"':
                raise ExpositionError(f"line {lineno}: expected '\"' at start of label value")
            value, i = _label_value(rest, i + 1, lineno)
            labels.append((name.group(), value))
            i = _skip_blanks(rest, i)
            if rest[i : i + 1] == ",":
                i += 1
            elif rest[i : i + 1] != "}":
                raise ExpositionError(f"line {lineno}: unexpected end of label value {value!r}")
        rest = rest[i:]
    parts = rest.split()
    if not parts or len(parts) > 2:
        raise ExpositionError(f"line {lineno}: expected a value and at most a timestamp")
    try:
        value = _parse_float(parts[0])
        stamp = int(parts[1]) if len(parts) == 2 else None
    except ValueError as e:
        raise ExpositionError(f"line {lineno}: bad value or timestamp: {rest!r}") from e
    if family.type in ("summary", "histogram"):
        return  # their parts are not read by the EPP; grouping them is enough here
    family.metrics.append(Sample(labels, value, stamp))


def parse_exposition(text: str) -> dict[str, Family]:
    """TextToMetricFamilies: name -> family; raises ExpositionError where the Go parser fails."""
    families: dict[str, Family] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.lstrip(" \t")
        if not line:
            continue
        if not line.startswith("#"):
            _parse_sample(families, line, lineno)
            continue
        words = line[1:].lstrip(" \t").split(None, 2)
        if len(words) < 2 or words[0] not in ("HELP", "TYPE"):
            continue  # a plain comment
        keyword, name = words[0], words[1]
        if not _METRIC_NAME.fullmatch(name):
            raise ExpositionError(f"line {lineno}: invalid metric name in comment")
        family = _family_for(families, name)
        rest = words[2] if len(words) == 3 else ""
        if keyword == "HELP":
            if family.help is not None:
                raise ExpositionError(f"line {lineno}: second HELP line for metric name {name!r}")
            family.help = rest
        elif rest:
            if family.type is not None:
                raise ExpositionError(
                    f"line {lineno}: second TYPE line for metric name {name!r}, or TYPE "
                    "reported after samples"
                )
            if rest.lower() not in _TYPES:
                raise ExpositionError(f"line {lineno}: unknown metric type {rest!r}")
            family.type = rest.lower()
    return {name: family for name, family in families.items() if family.metrics}


@dataclass
class EppMetrics:
    """fwkdl.Metrics fields the vLLM mapping fills, and the errors Extract would return."""

    waiting_queue_size: int = 0
    running_requests_size: int = 0
    kv_cache_usage_percent: float = 0.0
    active_models: set[str] = field(default_factory=set)
    waiting_models: set[str] = field(default_factory=set)
    max_active_models: int = 0
    cache_block_size: int = 0
    cache_num_blocks: int = 0
    errors: list[str] = field(default_factory=list)


def _value(family: Family, sample: Sample) -> float:
    """extractValue: a gauge's or counter's value; anything else reads 0."""
    return sample.value if family.type in ("gauge", "counter") else 0.0


def _latest(families: dict[str, Family], name: str) -> tuple[Family, Sample]:
    """Spec.getLatestMetric: the first series with the largest timestamp (none: 0 > -1)."""
    family = families.get(name)
    if family is None:
        raise LookupError(f"metric family {name!r} not found")
    best, recent = None, -1
    for sample in family.metrics:
        stamp = sample.timestamp_ms or 0
        if stamp > recent:
            best, recent = sample, stamp
    return family, best


def _atoi(text: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", text):  # strconv.Atoi
        raise ValueError(f'strconv.Atoi: parsing "{text}": invalid syntax')
    return int(text)


def _adapters(csv: str) -> set[str]:
    """addAdapters: split on ',', trim, drop empty entries."""
    return {name.strip() for name in csv.split(",") if name.strip()}


def epp_extract(families: dict[str, Family]) -> EppMetrics:
    """Extractor.Extract with the vLLM mapping (llm-d-router extractor.go)."""
    out = EppMetrics()
    for name, attr, convert in (
        (EPP_QUEUE, "waiting_queue_size", int),  # Go int(float64) truncates, as int() does
        (EPP_RUNNING, "running_requests_size", int),
        (EPP_KV_USAGE, "kv_cache_usage_percent", float),
    ):
        try:
            family, sample = _latest(families, name)
        except LookupError as e:
            out.errors.append(str(e))
            continue
        setattr(out, attr, convert(_value(family, sample)))
    lora = families.get(EPP_LORA)
    if lora is not None:  # LoRASpec.getLatestMetric: the series with the largest value
        best, recent = None, -1.0
        for sample in lora.metrics:
            if _value(lora, sample) > recent:
                best, recent = sample, _value(lora, sample)
        for key, value in best.labels if best else ():
            if key == "running_lora_adapters":
                out.active_models |= _adapters(value)
            elif key == "waiting_lora_adapters":
                out.waiting_models |= _adapters(value)
            elif key == "max_lora" and value:
                try:
                    out.max_active_models = _atoi(value)
                except ValueError as e:
                    out.errors.append(str(e))
    try:
        _, info = _latest(families, EPP_CACHE_INFO)
    except LookupError as e:
        out.errors.append(str(e))
    else:
        for key, value in info.labels:
            if key in ("block_size", "num_gpu_blocks") and value:
                try:
                    number = _atoi(value)
                except ValueError as e:
                    out.errors.append(str(e))
                    continue
                setattr(
                    out, "cache_block_size" if key == "block_size" else "cache_num_blocks", number
                )
    return out


def scrape(url: str) -> tuple[dict[str, Family], EppMetrics]:
    response = httpx.get(f"{url}/metrics")
    response.raise_for_status()
    families = parse_exposition(response.text)
    return families, epp_extract(families)


def check_epp_families(text: str, *, model_name: str) -> None:
    """Each family EPP reads is declared once, as a gauge, with vLLM's labels."""
    for name in EPP_FAMILIES:
        if name == EPP_LORA and name not in text:
            continue
        assert text.count(f"# TYPE {name} ") == 1, name
        assert f"# TYPE {name} gauge\n" in text
        assert text.count(f"# HELP {name} ") == 1, name
    families = parse_exposition(text)
    for name in (EPP_QUEUE, EPP_RUNNING, EPP_KV_USAGE):
        assert [dict(s.labels) for s in families[name].metrics] == [
            {"engine": "0", "model_name": model_name}
        ]
    for sample in families[EPP_LORA].metrics if EPP_LORA in families else ():
        assert sorted(key for key, _ in sample.labels) == [
            "max_lora", "running_lora_adapters", "waiting_lora_adapters",
        ]  # fmt: skip


# -- the re-implementation follows the Go code where it matters --------------------------------

LORA_SCRAPE = """# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a@1, b@2",waiting_lora_adapters=""} 20.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters="c"} 10.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=",d@3,"} 30.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m",engine="0"} 2.0
vllm:num_requests_running{model_name="other",engine="1"} 7.0
vllm:num_requests_waiting{model_name="m",engine="0"} 5.0
"""


def test_the_epp_parser_takes_the_latest_lora_series_and_splits_adapter_lists():
    metrics = epp_extract(parse_exposition(LORA_SCRAPE))
    assert metrics.active_models == set() and metrics.waiting_models == {"d@3"}  # value 30 wins
    assert metrics.max_active_models == 4
    assert metrics.running_requests_size == 2  # no timestamps: the first series wins
    assert metrics.waiting_queue_size == 0  # untyped reads as 0
    assert f"metric family {EPP_KV_USAGE!r} not found" in metrics.errors
    older = LORA_SCRAPE.replace("} 30.0", "} 15.0")
    assert epp_extract(parse_exposition(older)).active_models == {"a@1", "b@2"}  # trimmed


@pytest.mark.parametrize(
    "text, message",
    [
        ("# TYPE x gauge\n# TYPE x gauge\nx 1\n", "second TYPE line"),
        ("x 1\n# TYPE x gauge\n", "TYPE reported after samples"),
        ("# HELP x a\n# HELP x b\nx 1\n", "second HELP line"),
        ('x{a="1",a="2"} 1\n', "duplicate label names"),
        ('x{a="1\\t"} 1\n', "invalid escape sequence"),
        ("x 1_0\n", "bad value"),
        ("vllm.dotted 1\n", "bad value or timestamp"),
    ],
)
def test_the_epp_parser_rejects_what_expfmt_rejects(text: str, message: str):
    with pytest.raises(ExpositionError, match=message):
        parse_exposition(text)


# -- the fake engine's /metrics ----------------------------------------------------------------


def test_metrics_before_ready_read_zero_with_no_lora_family(fake_server):
    server = fake_server(engine=FakeEngine(start_delay=30), wait=False)
    text = httpx.get(f"{server.url}/metrics").text
    check_epp_families(text, model_name="fake")
    families, metrics = scrape(server.url)
    assert EPP_LORA not in families
    assert (metrics.running_requests_size, metrics.waiting_queue_size) == (0, 0)
    assert metrics.kv_cache_usage_percent == 0.0
    assert metrics.errors == [f"metric family {EPP_CACHE_INFO!r} not found"]
    assert families["vllm:gpu_cache_usage_perc"].type == "gauge"  # for EPPs before GIE #1905
    assert families["loraplex_engine_ready"].metrics[0].value == 0.0


def test_a_vllm_engine_not_started_exports_zeros_under_its_served_name():
    engine = VllmEngine(VllmEngineSettings(model_path="/nowhere", served_name="base"))
    text = render_metrics(CollectorRegistry(), engine).decode()
    check_epp_families(text, model_name="base")
    metrics = epp_extract(parse_exposition(text))
    assert (metrics.running_requests_size, metrics.waiting_queue_size) == (0, 0)
    assert EPP_LORA not in text


def test_running_adapters_show_while_streaming_and_clear_after(fake_server, tmp_path):
    server = fake_server(
        engine=FakeEngine(token_delay=0.05),
        adapters={"caps": str(tmp_path / "caps"), "prefix": str(tmp_path / "prefix")},
    )
    seen: list[EppMetrics] = []

    def stream(model: str) -> None:
        body = {"model": model, "prompt": "hello", "max_tokens": 9, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            for _ in response.iter_lines():
                pass

    threads = [threading.Thread(target=stream, args=(m,)) for m in ("caps", "prefix")]
    for thread in threads:
        thread.start()

    def both_running() -> bool:
        seen.append(scrape(server.url)[1])
        return seen[-1].active_models == {"caps", "prefix"}

    wait_for(both_running, timeout=10, every=0.02)
    assert seen[-1].running_requests_size == 2
    assert seen[-1].max_active_models == 4
    check_epp_families(httpx.get(f"{server.url}/metrics").text, model_name="fake")
    for thread in threads:
        thread.join()
    families, after = scrape(server.url)
    assert after.running_requests_size == 0 and after.active_models == set()
    assert len(families[EPP_LORA].metrics) >= 3  # one series per combination, the latest wins


def test_base_model_requests_count_as_running_but_name_no_adapter(fake_server):
    server = fake_server(engine=FakeEngine(token_delay=0.05))
    thread = threading.Thread(
        target=lambda: httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "fake", "prompt": "hi", "max_tokens": 9},
            timeout=30,
        )
    )
    thread.start()
    deadline = time.monotonic() + 10
    while (metrics := scrape(server.url)[1]).running_requests_size == 0:
        assert time.monotonic() < deadline, "the request never showed as running"
    assert metrics.active_models == set()
    thread.join()
