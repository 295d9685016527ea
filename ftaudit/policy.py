"""The policy (YAML): thresholds that turn a report into a risk level and a verdict."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import yaml

from ftaudit import yamltext
from ftaudit.errors import PolicyError
from ftaudit.report import DEFAULT_POLICY, LEVELS, TRIGGERS, AppliedPolicy, PolicyRules, Report, Summary, Verdict
from ftaudit.secrets import mask_shapes

NOT_METRICS = {"intruder_curve", "risk", "update", "by_kind", "by_layer", "heads"}
METRICS = tuple(f.name for f in fields(Summary) if f.name not in NOT_METRICS)
"""Numeric summary fields a risk rule can use."""


@dataclass(frozen=True)
class Policy(PolicyRules):
    source: str
    """`default`, or the path given."""


def default_text() -> str:
    return resources.files("ftaudit").joinpath("policy_default.yaml").read_text(encoding="utf-8")


def load(path: Path | None) -> Policy:
    """The policy at `path` layered over the default one."""
    default = yaml.safe_load(default_text())
    if path is None:
        return _build(default, DEFAULT_POLICY)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the policy ({e.strerror})") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: the policy is not UTF-8 text") from None
    try:
        user = yamltext.load(text) or {}
    except yamltext.InvalidYAML as e:
        raise PolicyError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(user, dict):
        raise PolicyError(f"{path}: a policy is a YAML mapping")
    unknown = set(user) - set(default)
    if unknown:
        raise PolicyError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(default)})")
    if not isinstance(user.get("verdict", {}), (dict, type(None))):  # None: the key left empty
        raise PolicyError(f"{path}: verdict must be a mapping")
    verdict = {**default["verdict"], **(user.get("verdict") or {})}
    merged = {**default, **user, "verdict": verdict}
    # a file named `default` is recorded by a path that cannot be read as the built-in policy
    return _build(merged, str(path) if str(path) != DEFAULT_POLICY else os.path.join(".", DEFAULT_POLICY))


def _build(doc: dict[str, object], source: str) -> Policy:
    def fail(msg: str) -> PolicyError:
        return PolicyError(f"{source}: {msg}")

    version = doc.get("version")
    if type(version) is not int or version != 1:  # not True, nor 1.0
        raise fail("version must be 1")
    k, epsilon = doc.get("k"), doc.get("epsilon")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise fail("k must be a positive integer")
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not 0 < epsilon <= 1:
        raise fail("epsilon must be a number in (0, 1]")
    risk = {} if doc.get("risk") is None else doc["risk"]  # None: the key left empty
    if not isinstance(risk, dict):
        raise fail("risk must map metrics to {medium: x, high: y}")
    for metric, levels in risk.items():
        if metric not in METRICS:
            raise fail(f"unknown risk metric {metric!r} (known: {', '.join(METRICS)})")
        if not isinstance(levels, dict) or not set(levels) <= {"medium", "high"} or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in levels.values()
        ):
            raise fail(f"risk.{metric} must be {{medium: number, high: number}}")
        if levels.get("medium", -math.inf) > levels.get("high", math.inf):
            raise fail(f"risk.{metric}: medium ({levels['medium']:g}) must not exceed high ({levels['high']:g})")
    verdict = doc["verdict"]
    if not isinstance(verdict, dict):
        raise fail("verdict must be a mapping")
    for key in ("warn_at", "fail_at"):
        if verdict.get(key) not in TRIGGERS:
            raise fail(f"verdict.{key} must be medium, high or never")
    for key in ("fail_on_nonfinite", "fail_on_missing"):
        if not isinstance(verdict.get(key), bool):
            raise fail(f"verdict.{key} must be true or false")
    unknown = set(verdict) - {"warn_at", "fail_at", "fail_on_nonfinite", "fail_on_missing"}
    if unknown:
        raise fail(f"unknown verdict key {sorted(unknown)[0]!r}")
    return Policy(
        k=k,
        epsilon=float(epsilon),
        risk={m: {lvl: float(v) for lvl, v in levels.items()} for m, levels in risk.items()},
        warn_at=verdict["warn_at"],
        fail_at=verdict["fail_at"],
        fail_on_nonfinite=verdict["fail_on_nonfinite"],
        fail_on_missing=verdict["fail_on_missing"],
        source=source,
    )


def apply(policy: Policy, report: Report) -> Verdict:
    """Set the report's risk level and verdict, with every reason that fired and the policy that judged it."""
    risk, reasons = "low", []
    for metric, levels in policy.risk.items():
        value = getattr(report.summary, metric)
        if value is None:
            continue
        for level in ("high", "medium"):
            if level in levels and value >= levels[level]:
                reasons.append(f"{metric} = {value:.4g} reaches the {level}-risk threshold {levels[level]:g}")
                if LEVELS.index(level) > LEVELS.index(risk):
                    risk = level
                break
    report.summary.risk = risk
    status = "pass"
    if policy.warn_at != "never" and LEVELS.index(risk) >= LEVELS.index(policy.warn_at):
        status = "warn"
    if policy.fail_at != "never" and LEVELS.index(risk) >= LEVELS.index(policy.fail_at):
        status = "fail"
    t = report.tensors
    if t.nonfinite:
        reasons.append(f"non-finite weights (NaN or Inf) in {_matrices(len(t.nonfinite))}, first {t.nonfinite[0]}")
        if policy.fail_on_nonfinite:
            status = "fail"
    missing = len(t.missing_in_base) + len(t.missing_in_model) + len(t.shape_mismatch)
    if missing:
        reasons.append(f"{_matrices(missing)} missing on one side or of different shapes")
        if policy.fail_on_missing:
            status = "fail"
    report.verdict = Verdict(status, reasons, applied(policy))
    return report.verdict


def applied(policy: Policy) -> AppliedPolicy:
    """`policy` as a report records it, with a digest of its content so that two reports' policies compare."""
    content = asdict(policy)
    source = content.pop("source")
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]
    return AppliedPolicy(source=mask_shapes(source), digest=digest, **content)


def _matrices(n: int) -> str:
    return f"{n} matrix" if n == 1 else f"{n} matrices"
