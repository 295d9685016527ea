"""Resolving the base model a tuned model declares."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ftaudit import frontmatter
from ftaudit.errors import BaseResolutionError, InvalidWeightsError, UnsupportedError
from ftaudit.sources.storage import Storage

PASS_BASE = "pass the base with --base"
FIX_CARD = f"fix the card (base_model: org/name), or {PASS_BASE}"


@dataclass(frozen=True)
class DeclaredBase:
    """The base model's id (or path), an optional revision, and where the declaration was found."""

    id: str
    revision: str | None
    declared_by: str


def declared_base(storage: Storage) -> DeclaredBase:
    """Read the base from the card's `base_model`, else from adapter_config.json."""
    readme = storage.read_text("README.md")
    text = readme or ""
    card = frontmatter.read(text)
    if card.get("base_model_relation") == "quantized":
        raise UnsupportedError(
            f"{storage.label}: the card declares a quantized model; ftaudit audits full-precision weights"
        )
    declared = card.get("base_model")
    if isinstance(declared, list):  # an empty one declares none
        if len(declared) > 1:
            raise BaseResolutionError(
                f"{storage.label}: the card declares {len(declared)} base models (a merge); {PASS_BASE}"
            )
        declared = declared[0] if declared else None
    from_adapter = _adapter_base(storage)
    if isinstance(declared, str) and declared.strip():
        name = declared.strip()
        # A PEFT card names the base without its revision; adapter_config.json has it.
        revision = from_adapter.revision if from_adapter is not None and from_adapter.id == name else None
        return DeclaredBase(name, revision, "card")
    if from_adapter is not None:
        return from_adapter
    unreadable = frontmatter.problem(text)
    if unreadable is not None:
        raise BaseResolutionError(
            f"{storage.label}: the card's front matter is not valid YAML ({unreadable}): {FIX_CARD}"
        )
    if declared is not None and not isinstance(declared, str):
        raise BaseResolutionError(
            f"{storage.label}: the card's base_model is {_yaml_kind(declared)}, not a Hub repository id: {FIX_CARD}"
        )
    if readme is None:  # a snapshot in the Hugging Face cache, say: transformers does not fetch the card
        raise BaseResolutionError(
            f"{storage.label}: has no card (README.md) and no adapter_config.json to declare its base model; "
            f"{PASS_BASE}"
        )
    raise BaseResolutionError(f"{storage.label}: declares no base model (card base_model or adapter_config.json); {PASS_BASE}")


def _yaml_kind(value: object) -> str:
    """What a YAML value that is not text is, in words."""
    kinds = {dict: "a mapping", list: "a list", bool: "true or false", int: "a number", float: "a number"}
    return kinds.get(type(value), f"a YAML {type(value).__name__}")


def unusable_name(label: str, declared: DeclaredBase, hub_only: bool = False) -> str:
    """The error for a declared base that is neither a folder here nor a Hub repo id (a URL, say), naming where the
    declaration is; it is never turned into an id by guessing. `hub_only`: the declaration was read from a Hub repo,
    which may name only a Hub repo, never a path on this machine."""
    if hub_only:
        where = "the card declares base_model" if declared.declared_by == "card" else (
            "adapter_config.json declares base_model_name_or_path")
        return (
            f"{label}: {where} {declared.id!r}, which is not a Hub repository id (org/name), and a Hub repo's "
            f"declaration is never opened as a path on this machine: {PASS_BASE}"
        )
    if declared.declared_by == "card":
        return (
            f"{label}: the card declares base_model {declared.id!r}, which is neither a Hub repository id nor a folder "
            f"here: base_model must be a repo id (org/name), or {PASS_BASE}"
        )
    return (
        f"{label}: adapter_config.json declares base_model_name_or_path {declared.id!r}, which is neither a Hub "
        f"repository id (org/name) nor a folder here: {PASS_BASE}"
    )


def _adapter_base(storage: Storage) -> DeclaredBase | None:
    """The base (and its revision) that adapter_config.json names, if any."""
    adapter = adapter_config(storage)
    name = adapter.get("base_model_name_or_path") if adapter else None
    if not (isinstance(name, str) and name.strip()):
        return None
    revision = adapter.get("revision") if adapter else None
    return DeclaredBase(name.strip(), revision if isinstance(revision, str) and revision else None, "adapter_config")


def adapter_config(storage: Storage) -> dict[str, object] | None:
    """The parsed adapter_config.json, or None when the snapshot is not a PEFT adapter."""
    text = storage.read_text("adapter_config.json")
    if text is None:
        return None
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise InvalidWeightsError(f"{storage.label}/adapter_config.json: not valid JSON") from None
    if not isinstance(config, dict):
        raise InvalidWeightsError(f"{storage.label}/adapter_config.json: not a JSON object")
    return config


@dataclass(frozen=True)
class Architecture:
    """What config.json says of how a model lays out its weights: its type, the width of its hidden states
    (a multimodal model's text model's) and, for DBRX, its number of experts; None where it says nothing."""

    model_type: str | None = None
    hidden_size: int | None = None
    experts: int | None = None
    """`ffn_config.moe_num_experts`: DBRX concatenates its experts' matrices (ftaudit.layout)."""
    tied_embeddings: bool | None = None
    """`tie_word_embeddings` (or its `text_config`'s): the output head shares the input embedding's weight."""
    configured: bool = False
    """Whether there is a config.json (a JSON object) to say all this."""


def architecture_of(storage: Storage) -> Architecture:
    """config.json's `model_type`, `hidden_size` (or its `text_config`'s, or `d_model`), DBRX's number of experts and
    `tie_word_embeddings`; nothing without one (an adapter, a bare checkpoint) or when unreadable as JSON."""
    text = storage.read_text("config.json")
    try:
        config = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        config = None
    if not isinstance(config, dict):
        return Architecture()
    model_type = config.get("model_type")
    text_config = config.get("text_config")
    ffn_config = config.get("ffn_config")
    sizes = [config.get("hidden_size"), text_config.get("hidden_size") if isinstance(text_config, dict) else None,
             config.get("d_model")]
    experts = ffn_config.get("moe_num_experts") if isinstance(ffn_config, dict) else None
    ties = [config.get("tie_word_embeddings"), text_config.get("tie_word_embeddings") if isinstance(text_config, dict)
            else None]
    return Architecture(model_type if isinstance(model_type, str) else None, _positive(sizes), _positive([experts]),
                        _tied(ties), configured=True)


def _tied(ties: list[object]) -> bool | None:
    """`tie_word_embeddings` of config.json and of its `text_config`, as transformers (5) takes them: tied where either
    says true (a multimodal model saved by transformers 4 says so in its text_config only), untied where one says
    false and none true, None where neither says."""
    if any(t is True for t in ties):
        return True
    return False if any(t is False for t in ties) else None


def _positive(values: list[object]) -> int | None:
    """The first of `values` that is a positive integer."""
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)
