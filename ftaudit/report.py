"""The audit report: typed dataclasses and their JSON form (schema in README.md)."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from ftaudit.errors import UsageError
from ftaudit.files import write_text

SCHEMA_VERSION = "1"
EPSILONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LEVELS = ("low", "medium", "high")
"""Forgetting-risk levels, lowest first."""
STATUSES = ("pass", "warn", "fail")
"""The verdicts of a report that the policy has judged."""
DEFAULT_POLICY = "default"
"""The source of the built-in policy, as a report records it."""
TRIGGERS = ("medium", "high", "never")
"""The risk levels at which a policy warns or fails, or never."""


@dataclass
class ModelRef:
    id: str
    revision: str | None
    adapter: dict[str, object] | None = None
    fingerprint: str | None = None
    """What identifies the weights of a model that has no revision (a local folder): ftaudit.sources.fingerprint."""


@dataclass
class BaseRef:
    id: str
    revision: str | None
    declared_by: str
    fingerprint: str | None = None
    """As ModelRef.fingerprint."""
    quantization: str | None = None
    """How the base's weights are stored where they are quantized ("bitsandbytes 4-bit (nf4)"): audited as the weights
    they dequantize to."""


@dataclass
class Settings:
    k: int
    epsilon: float
    epsilons: list[float]
    device: str
    include: list[str]
    exclude: list[str]
    shard: dict[str, int] | None = None
    """The part of the matrices audited, {"index": I, "count": N} (`--shard I/N`); None: all of them."""


@dataclass
class MatrixResult:
    name: str
    kind: str
    layer: int | None
    shape: list[int]
    max_cos: list[float]
    intruders: int
    sigma: list[float]
    match: list[int | None]
    outside_span: list[float]
    indicators: dict[str, float | None]
    intruder_strength: list[dict[str, float | int | None]] = field(default_factory=list)
    lora: dict[str, float] | None = None


@dataclass
class TensorIssues:
    missing_in_base: list[str] = field(default_factory=list)
    missing_in_model: list[str] = field(default_factory=list)
    shape_mismatch: list[dict[str, object]] = field(default_factory=list)
    vocab_resized: list[dict[str, object]] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    not_selected: int = 0
    """Matrices left out by the selection (kinds, --include, --exclude), each expert's of a stack counted."""
    unchanged: list[str] = field(default_factory=list)
    """Selected matrices identical in both models (ΔW = 0 exactly): nothing to measure, so not analysed."""
    tied_heads: list[dict[str, str]] = field(default_factory=list)
    """Output heads that one model (`side`) does not store, tied to its input embedding (`embedding`), and the other
    stores as its own (`name`): compared with that embedding, the head transformers loads."""


@dataclass
class Summary:
    matrices_analysed: int
    intruder_dimensions: int
    intruder_curve: dict[str, int]
    matrices_with_intruders: int
    intruder_rate: float
    intruder_strength_max: float
    relative_update_norm_max: float | None
    relative_update_norm_median: float | None
    spectral_spike_max: float | None
    spectral_spike_median: float | None
    effective_rank_median: float | None
    energy_rank_90_median: float | None
    subspace_drift_deg_max: float | None
    head_scale_drift: float | None
    update: dict[str, object]
    by_kind: dict[str, dict[str, object]]
    by_layer: dict[str, dict[str, object]]
    heads: dict[str, dict[str, float | None]]
    risk: str = "unknown"


@dataclass(frozen=True)
class PolicyRules:
    """What a policy sets: what is measured (k, epsilon), the risk thresholds, and what the verdict makes of them."""

    k: int
    epsilon: float
    risk: dict[str, dict[str, float]]
    warn_at: str
    fail_at: str
    fail_on_nonfinite: bool
    fail_on_missing: bool


@dataclass(frozen=True)
class AppliedPolicy(PolicyRules):
    """The policy that judged a report: its rules, where it came from, and a digest of the rules."""

    source: str
    """`default` (DEFAULT_POLICY), or the path given to --policy, anything shaped like a secret masked."""
    digest: str
    """The first 12 hex digits of SHA-256 over the rules (keys sorted, compact JSON)."""

    @property
    def custom(self) -> bool:
        """Whether a policy file judged the report, not the built-in policy."""
        return self.source != DEFAULT_POLICY

    def describe(self) -> str:
        """The policy in a few words: its source and digest."""
        return f"{self.source} (digest {self.digest})"


@dataclass
class Assignment:
    """What a shard's audit (`check --shard`) was given of the whole audit, which `merge` checks its report against."""

    matrices: int
    """The matrices given to the shard: those its report lists in `matrices`, `tensors.nonfinite` and
    `tensors.unchanged`."""
    heads: int
    """The tensors it measured for their row norms: those in `summary.heads`."""
    all_matrices: int
    """The matrices of the whole audit, split among its shards."""
    names_sha256: str
    """Hex SHA-256 of the names of both (ftaudit.shards.names_sha256)."""


@dataclass
class Verdict:
    status: str
    reasons: list[str]
    policy: AppliedPolicy | None = None
    """None in a report not yet judged, or written by an ftaudit that did not record it."""


@dataclass
class Report:
    tool: dict[str, str]
    created_at: str
    model: ModelRef
    base: BaseRef
    settings: Settings
    summary: Summary
    tensors: TensorIssues
    matrices: list[MatrixResult]
    verdict: Verdict = field(default_factory=lambda: Verdict("pending", []))
    assignment: Assignment | None = None
    """A shard's (`settings.shard`); None for a whole audit."""
    schema_version: str = SCHEMA_VERSION

    @property
    def nonfinite_matrices(self) -> list[str]:
        """`tensors.nonfinite` less the heads and embeddings measured for their row norms alone (`summary.heads`)."""
        return [n for n in self.tensors.nonfinite if n not in self.summary.heads]

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), **data}

    @classmethod
    def from_dict(cls, data: object) -> Report:
        """A report read back from its JSON form (same schema version)."""
        if not isinstance(data, dict):
            raise UsageError(f"not an ftaudit report (a JSON {type(data).__name__}, not an object)")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UsageError(f"report schema version {data.get('schema_version')!r} is not {SCHEMA_VERSION!r}")
        if data.get("kind") == "fix":
            raise UsageError("the record of `ftaudit fix --json`, not a report of `ftaudit check --json`")
        try:
            d = dict(data)
            d.pop("schema_version")
            tool = d["tool"]
            if not isinstance(tool, dict) or tool.get("name") != "ftaudit" or not isinstance(tool.get("version"), str):
                raise TypeError(f"tool must be {{'name': 'ftaudit', 'version': ...}}, not {tool!r}")
            created_at = d["created_at"]
            if not isinstance(created_at, str):
                raise TypeError(f"created_at must be str (an ISO 8601 timestamp), not {json.dumps(created_at)[:40]}")
            return cls(
                tool=tool,
                created_at=created_at,
                model=ModelRef(**_known(ModelRef, d["model"])),
                base=BaseRef(**_known(BaseRef, d["base"])),
                settings=Settings(**_known(Settings, d["settings"])),
                summary=Summary(**_known(Summary, d["summary"])),
                tensors=TensorIssues(**_known(TensorIssues, d["tensors"])),
                matrices=[MatrixResult(**_known(MatrixResult, m)) for m in d["matrices"]],
                verdict=Verdict(**_known(Verdict, d["verdict"])),
                assignment=None if d.get("assignment") is None else Assignment(**_known(Assignment, d["assignment"])),
            )
        except (KeyError, TypeError) as e:
            raise UsageError(f"not an ftaudit report ({type(e).__name__}: {e})") from None

    @classmethod
    def read(cls, path: Path) -> Report:
        """Read a report written by `write` (which writes no NaN or Infinity, Python's extensions of JSON)."""
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_json))
        except OSError as e:
            raise UsageError(f"{path}: cannot read the report ({e.strerror})") from None
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise UsageError(f"{path}: not valid JSON") from None
        except UsageError as e:
            raise UsageError(f"{path}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write(self, path: Path) -> None:
        """Write the JSON atomically (a reader never sees half a report)."""
        write_text(path, self.to_json())


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is no JSON number")


_VALUES = {("Summary", "risk"): LEVELS, ("Verdict", "status"): STATUSES, ("AppliedPolicy", "warn_at"): TRIGGERS,
           ("AppliedPolicy", "fail_at"): TRIGGERS}
"""The fields whose strings are one of a few."""


def _known(cls: type, data: object) -> dict[str, typing.Any]:
    """The fields of `cls` in `data`, each checked against its declared type, down to the items of its lists and
    objects, and to the values it can take; a field whose type is a dataclass is built as one. A later ftaudit may
    add fields within a schema version, which this one skips."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: data[f.name] for f in fields(cls) if f.name in data}
    for name, value in known.items():
        nested = _dataclass_in(hints[name])
        if nested is not None and value is not None:
            if not isinstance(value, dict):
                raise TypeError(f"{cls.__name__}.{name} must be a JSON object or null, not {json.dumps(value)[:40]}")
            known[name] = nested(**_known(nested, value))
            continue
        if not _has_type(value, hints[name]):
            what = hints[name].__name__ if isinstance(hints[name], type) else hints[name]
            raise TypeError(f"{cls.__name__}.{name} must be {what}, not {json.dumps(value)[:40]}")
        allowed = _VALUES.get((cls.__name__, name))
        if allowed is not None and value not in allowed:
            raise TypeError(f"{cls.__name__}.{name} must be one of {', '.join(allowed)}, not {json.dumps(value)[:40]}")
    return known


def _dataclass_in(hint: object) -> type | None:
    """The dataclass among the types of `hint` (`AppliedPolicy | None`), if any."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next((o for o in options if isinstance(o, type) and is_dataclass(o)), None)


def _has_type(value: object, hint: object) -> bool:
    """Whether a JSON value has the type `hint` (`int | None`, `list[float]`, `dict[str, float | None]`, ...), its
    lists' items and its objects' keys and values included; an int is a float too, but a JSON true is no number."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return any(_is(value, option) for option in options)


def _is(value: object, hint: object) -> bool:
    kind, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if kind is object:
        return True
    if isinstance(value, bool):
        return kind is bool
    if kind is list:
        return isinstance(value, list) and all(_has_type(item, args[0]) for item in value)
    if kind is dict:
        return isinstance(value, dict) and all(_has_type(k, args[0]) and _has_type(v, args[1])
                                               for k, v in value.items())
    return isinstance(value, (int, float) if kind is float else kind)  # type: ignore[arg-type]
