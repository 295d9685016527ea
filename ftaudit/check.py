"""`ftaudit check` as a library call: resolve both models, audit them, apply the policy."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ftaudit.audit import AuditOptions, Progress, Tensors, run_audit
from ftaudit.cache import SpectrumCache
from ftaudit.base import PASS_BASE, DeclaredBase, adapter_config, architecture_of, declared_base, unusable_name
from ftaudit.errors import BaseResolutionError, InvalidWeightsError, UnsupportedError, UsageError
from ftaudit.layout import Layout, matrix_tensor
from ftaudit.pairing import align, input_embeddings, quantized_matrix
from ftaudit.policy import Policy, apply
from ftaudit.report import BaseRef, ModelRef, Report
from ftaudit.sources import Snapshot, open_snapshot, open_weights, opens
from ftaudit.sources.adapters import AdaptedTensors, LoraAdapter
from ftaudit.sources.checkpoint import Checkpoint, some_of, unread_weights
from ftaudit.sources.fingerprint import fingerprint
from ftaudit.sources.pickled import PickleCheckpoint
from ftaudit.sources.quantized_4bit import dequantize_4bit
from ftaudit.sources.quantized_8bit import dequantize_8bit
from ftaudit.sources.stored_as import StoredAs
from ftaudit.sources.tied import embedding_heads, is_head, own_heads, stored_copies, tie_copies, tied_head_entries

log = logging.getLogger("ftaudit")


@dataclass(frozen=True)
class Target:
    """What to audit: the tuned model and, optionally, its base and revisions."""

    model: str
    base: str | None = None
    revision: str | None = None
    base_revision: str | None = None
    token: str | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class Opened:
    """Both sides of an audit, resolved and opened: snapshots, tensors, and how the report names them."""

    tuned: Snapshot
    base: Snapshot
    tuned_side: Tensors
    base_side: Checkpoint | PickleCheckpoint | StoredAs
    model_ref: ModelRef
    base_ref: BaseRef
    layout: Layout = Layout()
    """Which of the models' tensors hold their matrices in × out (ftaudit.layout)."""
    tied_heads: tuple[dict[str, str], ...] = ()
    """The output heads that one side stores and the other, tied to its embedding, does not: read as that embedding
    (the report's `tensors.tied_heads`)."""
    base_tied: frozenset[str] = frozenset()
    """The base's tensors that its config.json ties, head and embedding, as stored: a head stored as a copy of its
    embedding and that embedding; where no head is stored, the token embeddings."""


def _same_model(declared: str, model: str) -> bool:
    """Whether a declared base names the model itself: the same folder, or the same Hub id."""
    paths = [Path(name).expanduser() for name in (declared, model)]
    if all(os.path.exists(path) for path in paths):  # False where a path cannot be looked at
        return paths[0].resolve() == paths[1].resolve()
    return declared.lower() == model.lower()


def open_target(target: Target, tuned: Snapshot | None = None) -> Opened:
    """Open the tuned model and the base it declares (or `target.base`); an adapter is applied to the base. `tuned`
    is the model's snapshot when it is already open (a folder being written, named as its destination)."""
    tuned = tuned or open_snapshot(target.model, target.revision, target.token)
    hub_only = False
    if target.base is not None:
        declared = DeclaredBase(target.base, target.base_revision, "cli")
    else:
        declared = declared_base(tuned.storage)
        hub_only = tuned.revision is not None  # a Hub repo's declaration names a Hub repo, never a path here
        if _same_model(declared.id, target.model):
            raise BaseResolutionError(
                f"{tuned.storage.label}: declares itself as its base model ({declared.declared_by}: {declared.id}), "
                f"which would find no change at all; {PASS_BASE}"
            )
        if not opens(declared.id, hub_only):
            raise BaseResolutionError(unusable_name(tuned.storage.label, declared, hub_only))
        if target.base_revision:
            declared = DeclaredBase(declared.id, target.base_revision, declared.declared_by)
    base = open_snapshot(declared.id, declared.revision, target.token, hub_only)
    if adapter_config(base.storage) is not None:
        raise UsageError(
            f"{base.storage.label}: a PEFT adapter (adapter_config.json), not a base model: "
            "pass the model it adapts with --base")
    architectures = architecture_of(tuned.storage), architecture_of(base.storage)  # config.json's, each read once
    _warn_other_architecture(tuned, base, *(a.model_type for a in architectures))
    layout = Layout.of(*architectures)
    config = adapter_config(tuned.storage)
    # A side with no config.json to say it ties (a bare checkpoint) may hold a model with no head, or an untied one;
    # but the base of an adapter has the modules the adapter names (a head saved whole, or one it adapts), and a head
    # that such a base does not store is its tied embedding, as where a config.json leaves the tie unsaid.
    ties = [a.tied_embeddings if a.configured or (side == "base" and config is not None) else False
            for side, a in zip(("model", "base"), architectures)]
    base_side = open_weights(base.storage, allow_pickle=target.allow_pickle)
    quantized = _dequantized(base_side, base.storage.label)
    base_side = _restacked(base_side, layout, base.storage.label)
    _refuse_quantized(base.storage.label, base_side, "pass the full-precision base with --base")
    _warn_native_format(base, base_side)
    tied_heads: tuple[dict[str, str], ...] = ()
    base_tied: frozenset[str] = frozenset()
    model_ref = ModelRef(tuned.id, tuned.revision)
    base_ref = BaseRef(base.id, base.revision, declared.declared_by, _fingerprint(base, base_side), quantized)
    base_stored: Checkpoint | PickleCheckpoint | StoredAs = base_side
    base_copies = stored_copies(base_side, ties[1], base.storage.label)
    if config is None:
        weights = _restacked(open_weights(tuned.storage, allow_pickle=target.allow_pickle), layout, tuned.storage.label)
        _refuse_quantized(tuned.storage.label, weights, "audit the model before quantization")
        _warn_native_format(tuned, weights)
        model_ref.fingerprint = _fingerprint(tuned, weights)
        copies = stored_copies(weights, ties[0], tuned.storage.label)
        untied = own_heads(weights.infos, copies), own_heads(base_side.infos, base_copies)
        tie_copies(base_side, base_copies, untied[0])
        tie_copies(weights, copies, untied[1])
        sides = {"model": embedding_heads(weights, base_side.infos, ties[0]),
                 "base": embedding_heads(base_side, weights.infos, ties[1])}
        tied_heads = tuple(entry for side, heads in sides.items() for entry in tied_head_entries(side, heads))
        # one side may hold experts' stacks and routers as transformers' layers name them, the other as published
        tuned_side: Tensors = StoredAs.of(weights, base_side.infos, layout)
        base_stored = StoredAs.of(base_side, weights.infos, layout)
    else:
        weights = _restacked(open_weights(tuned.storage, "adapter_model", target.allow_pickle), layout,
                             tuned.storage.label)
        model_ref.fingerprint = _fingerprint(tuned, weights, json.dumps(config, sort_keys=True))
        lora = LoraAdapter(tuned.storage, config, weights)
        # PEFT's merge unties a head from its embedding where the adapter saves either whole (modules_to_save)
        tie_copies(base_side, base_copies, bool(saved_whole(lora, base_side) & {*base_copies, *base_copies.values()}))
        base_tied = _tied(base_side, base_copies, ties[1])
        # and a head it saves whole is compared with the base's embedding, where the base stores no head
        saved = {key: weights.infos[name] for key, name in lora.replaced.items() if is_head(key)}
        tied_heads = tied_head_entries("base", embedding_heads(base_side, saved, ties[1]))
        adapted = AdaptedTensors(lora, base_side, layout)
        for embedding, head in adapted.tied.items():
            what = ("its trained token rows are audited as PEFT merges them, as rows" if adapted.token_rows(embedding)
                    else "its LoRA is audited as PEFT merges it, as an update")
            log.warning("%s is tied to the input embedding (tie_word_embeddings): %s of %s, the embedding's weight too",
                        head.removesuffix(".weight"), what, embedding)
        model_ref.adapter = adapted.describe()
        tuned_side = adapted
    return Opened(tuned, base, tuned_side, base_stored, model_ref, base_ref, layout, tied_heads, base_tied)


def saved_whole(adapter: LoraAdapter, base: Checkpoint | PickleCheckpoint) -> set[str]:
    """The base's tensors that `adapter` saves whole (modules_to_save)."""
    base_map, replaced = align(base.infos, adapter.replaced)
    return {base_map[key] for key in replaced if key in base_map}


def _tied(base: Checkpoint | PickleCheckpoint, copies: dict[str, str], tied: bool | None) -> frozenset[str]:
    """`Opened.base_tied` of a base whose config.json ties (`tied`: true or unsaid) or not, its heads stored as copies
    of their embeddings `copies` (head → embedding)."""
    if tied is False:
        return frozenset()
    infos = base.infos
    if copies or any(is_head(name) for name in infos):
        return frozenset({*copies, *copies.values()})
    widths = {info.shape[1] for info in infos.values() if len(info.shape) == 2}
    return frozenset(name for width in widths for name in input_embeddings(infos, (None, width)))


def _fingerprint(snapshot: Snapshot, weights: Checkpoint | PickleCheckpoint, *texts: str) -> str | None:
    """What identifies the weights of a snapshot that no revision names (a local folder); None for a Hub commit."""
    return fingerprint(weights, *texts) if snapshot.revision is None else None


def _restacked(weights: Checkpoint | PickleCheckpoint, layout: Layout, label: str) -> Checkpoint | PickleCheckpoint:
    """`weights`, with the 2-D tensors that hold experts' matrices one above the other read as stacks (DBRX's);
    InvalidWeightsError for one whose rows do not divide into config.json's number of experts' matrices."""
    for name, info in weights.infos.items():
        shape = layout.stacked_shape(name, info.shape)
        if shape is not None:
            weights.restack(name, shape)
        elif layout.concatenated(name) and len(info.shape) == 2:
            raise InvalidWeightsError(
                f"{label}: {name} {list(info.shape)} does not divide into the {layout.concatenated_experts} experts' "
                "matrices that config.json gives (ffn_config.moe_num_experts)")
    return weights


def _warn_other_architecture(tuned: Snapshot, base: Snapshot, tuned_type: str | None, base_type: str | None) -> None:
    """Warn when both config.json files name a model type and the types differ: names can still line up
    (a RoBERTa against a BERT), and every matrix would then read as changed beyond recognition."""
    if tuned_type is not None and base_type is not None and tuned_type != base_type:
        log.warning("%s is a %s model and %s a %s one (config.json model_type): is it really its base?",
                    tuned.id, tuned_type, base.id, base_type)


def _warn_native_format(snapshot: Snapshot, weights: Checkpoint | PickleCheckpoint) -> None:
    """Warn when the weights read are in Mistral's own format (consolidated.safetensors and params.json, no
    config.json), whose tensor names no transformers-format model shares: the audit then finds nothing to compare."""
    files = snapshot.storage.files()
    if "params.json" not in files or "config.json" in files or not isinstance(weights, Checkpoint):
        return
    read = {ref.file for ref in weights.tensors.values()}
    if read and all(name.startswith("consolidated") for name in read):
        log.warning("%s: weights in Mistral's own format (%s with params.json, no config.json), whose tensor names "
                    "(layers.0.attention.wq.weight) are not transformers' (model.layers.0.self_attn.q_proj.weight): "
                    "they pair only with weights in that format", snapshot.id, _listed(sorted(read)))


def _dequantized(weights: Checkpoint | PickleCheckpoint, label: str) -> str | None:
    """Read the base's bitsandbytes 4-bit and 8-bit matrices as the weights they stand for, saying so;
    `BaseRef.quantization`."""
    if not isinstance(weights, Checkpoint):
        return None
    kinds = dequantize_4bit(weights, label)
    found = [f"bitsandbytes 4-bit ({', '.join(kinds)})"] if kinds else []
    if dequantize_8bit(weights, label):
        found.append("bitsandbytes 8-bit (LLM.int8)")
    if not found:
        return None
    quantization = " and ".join(found)
    log.warning("%s: %s weights, audited as the weights they dequantize to (the W0 that an adapter trained on them, "
                "as QLoRA trains, adds to)", label, quantization)
    return quantization


def _refuse_quantized(label: str, weights: Checkpoint | PickleCheckpoint, what_to_do: str) -> None:
    """UnsupportedError when `weights` hold quantized matrices, whose stored values are not the weights."""
    found = quantized_matrix(weights.infos)
    if found is not None:
        raise UnsupportedError(
            f"{label}: quantized weights ({found.name} is {found.dtype}); ftaudit audits full-precision weights: "
            f"{what_to_do}"
        )


def check(
    target: Target,
    options: AuditOptions,
    policy: Policy,
    progress: Progress | None = None,
    cache: SpectrumCache | None = None,
) -> Report:
    """Audit `target` and return the report with its risk level and verdict set."""
    opened = open_target(target)
    unread = unread_weights(opened.tuned.storage)
    if unread:
        log.warning("%s: weights in subfolders are not audited (the audit reads the top-level weights only): %s",
                    opened.tuned.storage.label, some_of(unread, 3))
    return audit_opened(opened, options, policy, progress, cache)


def audit_opened(
    opened: Opened,
    options: AuditOptions,
    policy: Policy,
    progress: Progress | None = None,
    cache: SpectrumCache | None = None,
) -> Report:
    """Audit two opened sides and apply the policy."""
    tuned_side = opened.tuned_side
    adapter = tuned_side if isinstance(tuned_side, AdaptedTensors) else None
    report = run_audit(
        opened.model_ref, opened.base_ref, tuned_side, opened.base_side, options, progress, cache,
        adapter.low_rank if adapter else None, adapter.unchanged if adapter else frozenset(), opened.layout,
        adapter.tied if adapter else {},
    )
    report.tensors.tied_heads = list(opened.tied_heads)
    if options.shard is None:  # a shard may hold none of the matrices: its merge is checked instead
        check_audited(report)
    if isinstance(tuned_side, AdaptedTensors):
        for matrix in report.matrices:
            module = tuned_side.module(matrix_tensor(matrix.name))
            if module is not None:
                matrix.lora = {"rank": module.rank, "alpha": module.alpha, "scaling": module.scaling}
    apply(policy, report)
    return report


def check_audited(report: Report) -> None:
    """Refuse the report of an audit that compared no matrix, saying why; warn when every one it compared is
    unchanged: that only heads or embeddings measured for their row norms changed, or, when none did nor holds a
    NaN or inf, that the model may be its base."""
    if report.summary.matrices_analysed == 0 and not report.nonfinite_matrices:
        if not report.tensors.unchanged:
            raise UnsupportedError(_nothing_to_audit(report))
        changed = [name for name, head in report.summary.heads.items() if _moved(head)]
        if changed:
            log.warning("every matrix compared is identical in %s and %s; of the heads and embeddings measured for "
                        "their row norms, %s changed: a fine-tune of those alone (--include head or --include "
                        "embedding analyses them as matrices)", report.model.id, report.base.id, _listed(changed))
        elif not report.tensors.nonfinite:
            log.warning("every matrix compared is identical in %s and %s: is the model its base itself?",
                        report.model.id, report.base.id)


def _moved(head: dict[str, float | None]) -> bool:
    """Whether a head's row norms moved: their mean, or any row's."""
    return head["mean_norm_ratio"] not in (None, 1.0) or head["max_relative_change"] not in (None, 0.0)


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"


def _nothing_to_audit(report: Report) -> str:
    """Why no matrix was analysed: shapes that differ, a selection that leaves none, or no names in common."""
    t = report.tensors
    if t.shape_mismatch:
        first = t.shape_mismatch[0]
        return (
            f"no matrix of the model matches the base in shape (e.g. {first['name']}: base {first['base']}, "
            f"model {first['model']}): is {report.base.id} really its base?"
        )
    if t.not_selected and not (t.missing_in_base or t.missing_in_model):
        return ("the selection (--include/--exclude) leaves no weight matrix to analyse: exclude fewer, or --include "
                "other module kinds")
    return f"the model and {report.base.id} share no analysable weight matrices: is it really the base?"
