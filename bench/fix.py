"""What `ftaudit fix` does to the task and to forgetting: the paper's Section 5 on MiniLM.

Usage: python bench/fix.py

Runs `ftaudit fix` (ε = 0.5, k = 10) at λ ∈ {1, 0.75, 0.5, 0.3, 0} on the committed LoRA fine-tune
examples/minilm-lora-r8 (rank 8, α 16), written back as an adapter of the same rank and as a merged
model, and on a full fine-tune of the same task (examples/minilm_finetunes.py, for contrast). On each
output it measures the intruders left, the held-out task accuracy and forgetting: how far the
embeddings of 50 generic sentences moved from the base's (mean 1 − cosine). As the contrast the
paper's authors concede, it also scales the whole LoRA update by λ (lora_alpha × λ). Prints the
table and writes it into docs/fix.md, between the bench markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples import minilm_finetunes as ft  # noqa: E402
from ftaudit import policy  # noqa: E402
from ftaudit.audit import AuditOptions  # noqa: E402
from ftaudit.cache import SpectrumCache  # noqa: E402
from ftaudit.check import Target, check  # noqa: E402
from ftaudit.fix import FixOptions, fix  # noqa: E402
from ftaudit.report import Report  # noqa: E402

WORK = ROOT / "bench" / ".work" / "fix"
ADAPTER = ROOT / "examples" / "minilm-lora-r8"
DOC = ROOT / "docs" / "fix.md"
BEGIN, END = "<!-- bench/fix.py:begin -->", "<!-- bench/fix.py:end -->"
LAMBDAS = (1.0, 0.75, 0.5, 0.3, 0.0)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    shutil.rmtree(WORK / "out", ignore_errors=True)
    full = WORK / "full-fine-tune"
    if not (full / "model.safetensors").exists():
        ft.make_full(full)
    rules, options = policy.load(None), AuditOptions(device="cpu")
    cache = SpectrumCache(WORK / "spectra")
    base = ft.base_model_dir()
    rows = []
    for label, model, merge in (("LoRA r=8", ADAPTER, False), ("LoRA r=8", ADAPTER, True),
                                ("full fine-tune", full, False)):
        for lam in LAMBDAS:
            out = WORK / "out" / f"{model.name}-{'merged' if merge else 'fix'}-{lam:g}"
            result = fix(Target(str(model), base=str(base)), out, options, FixOptions(lam=lam, merge=merge), rules,
                         cache=cache)
            written = {"model": "model", "adapter": "adapter (same r)", "merged": "merged model"}[result.format]
            rows.append(_row(label, f"fix → {written}", lam, result.after, out, result.directions_scaled,
                             result.truncation_error_max))
    for lam in LAMBDAS:
        out = _scaled_adapter(lam)
        report = check(Target(str(out), base=str(base)), options, rules, cache=cache)
        rows.append(_row("LoRA r=8", "whole update × λ", lam, report, out, None, None))
    write(rows)


def _scaled_adapter(lam: float) -> Path:
    """A copy of the example adapter with lora_alpha × λ: the whole update scaled by λ."""
    out = WORK / "out" / f"scaled-{lam:g}"
    shutil.copytree(ADAPTER, out)
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    config["lora_alpha"] *= lam
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def _row(run: str, how: str, lam: float, report: Report, out: Path, scaled: int | None,
         cut_error: float | None) -> dict[str, object]:
    s = report.summary
    row = {
        "run": run, "how": how, "lambda": lam, "scaled": scaled, "intruders": s.intruder_dimensions,
        "strength": s.intruder_strength_max, "norm": s.relative_update_norm_median, "risk": s.risk,
        "accuracy": ft.task_accuracy(out), "forgetting": ft.embedding_drift(ft.base_model_dir(), out),
        "cut_error": cut_error,
    }
    print(row, flush=True)
    return row


def write(rows: list[dict[str, object]]) -> None:
    reference = {(r["run"], r["how"]): r["forgetting"] for r in rows if r["lambda"] == 1.0}
    lines = [
        BEGIN,
        f"Measured by `python bench/fix.py` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
        f"{'a CUDA GPU present but not used' if torch.cuda.is_available() else 'no GPU'}, device cpu;",
        "ε = 0.5, k = 10, default policy. *Forgetting*: mean 1 − cosine between the base's and the model's",
        "embeddings of 50 generic sentences (0 = the base's behaviour); *vs λ = 1*: its change from the same",
        "row group at λ = 1.",
        "",
        "| fine-tune | written as | λ | directions scaled | intruders after (ε 0.5) | strongest intruder σ/σ₁(W₀) "
        "| ‖ΔW‖/‖W₀‖ median | risk | task acc. | forgetting | vs λ = 1 | rank-r cut error max |",
        "|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        ref = reference[(r["run"], r["how"])]
        change = f"{(r['forgetting'] - ref) / ref:+.0%}" if ref else "n/a"
        lines.append(
            f"| {r['run']} | {r['how']} | {r['lambda']:g} | {_num(r['scaled'], 'd')} | {r['intruders']} "
            f"| {r['strength']:.3f} | {r['norm']:.3f} | {r['risk']} | {r['accuracy']:.2f} "
            f"| {max(r['forgetting'], 0.0):.3f} "
            f"| {change} | {_num(r['cut_error'], '.3f')} |"
        )
    lines.append(END)
    block = "\n".join(lines)
    text = DOC.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text, encoding="utf-8")
    print(block)


def _num(value: object, spec: str) -> str:
    return "–" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
