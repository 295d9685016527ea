"""Does ftaudit's risk level track real forgetting? The paper's headline on the packaged MiniLM.

Usage: python bench/forgetting.py [--seeds 0 1]

Fine-tunes all-MiniLM-L6-v2 on one synthetic task with LoRA at ranks 1, 8 and 64 (alpha = 2r) and
with full fine-tuning, audits each against the base with the default policy, and measures forgetting
of the pre-trained behaviour directly: how far the tuned model's sentence embeddings of 50 generic
sentences moved from the base's (mean 1 − cosine). Prints the table and writes docs/forgetting.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples import minilm_finetunes as ft  # noqa: E402
from ftaudit import policy  # noqa: E402
from ftaudit.audit import AuditOptions  # noqa: E402
from ftaudit.check import Target, check  # noqa: E402

WORK = ROOT / "bench" / ".work" / "forgetting"
RUNS = {
    "LoRA r=1": lambda out, seed: ft.make_lora(out, rank=1, seed=seed, save="merged"),
    "LoRA r=8": lambda out, seed: ft.make_lora(out, rank=8, seed=seed, save="merged"),
    "LoRA r=64": lambda out, seed: ft.make_lora(out, rank=64, lr=2e-3, seed=seed, save="merged"),
    "full fine-tune": lambda out, seed: ft.make_full(out, seed=seed),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    args = parser.parse_args()
    rules = policy.load(None)
    rows = []
    for label, make in RUNS.items():
        for seed in args.seeds:
            out = WORK / f"{label.replace(' ', '-').replace('=', '')}-seed{seed}"
            if not (out / "model.safetensors").exists():
                make(out, seed)
            report = check(Target(str(out), base=str(ft.base_model_dir())), AuditOptions(device="cpu"), rules)
            s = report.summary
            row = {
                "run": label, "seed": seed,
                "curve": [s.intruder_curve[f"{e:g}"] for e in report.settings.epsilons],
                "norm": s.relative_update_norm_median, "norm_max": s.relative_update_norm_max,
                "spike": s.spectral_spike_max, "update": s.update, "risk": s.risk,
                "verdict": report.verdict.status, "accuracy": ft.task_accuracy(out),
                "drift": ft.embedding_drift(ft.base_model_dir(), out),
            }
            rows.append(row)
            print(row, flush=True)
    write(rows, report.settings.epsilons)


def write(rows: list[dict[str, object]], epsilons: list[float]) -> None:
    eps = " | ".join(f"ε {e:g}" for e in epsilons)
    lines = [
        "# Intruders, risk and real forgetting on MiniLM",
        "",
        f"Written by `python bench/forgetting.py` on {time.strftime('%Y-%m-%d')}. Each row is a real fine-tune of",
        "all-MiniLM-L6-v2 (36 attention and MLP matrices, k = 10) on the same synthetic 16-class task, audited",
        "with the default policy. *Forgetting* is measured on the model itself: the mean 1 − cosine between",
        "the base's and the tuned model's embeddings of 50 generic sentences (0 = unchanged behaviour).",
        "",
        f"| run | seed | {eps} | ‖ΔW‖/‖W0‖ median | max | spike max | update | task acc. | forgetting | risk | verdict |",
        "|---|---|" + "---:|" * len(epsilons) + "---:|---:|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        update = r["update"]
        kind = f"{update['type']}" + (f", r≈{update['rank']}" if update.get("rank") else "")
        lines.append(
            f"| {r['run']} | {r['seed']} | " + " | ".join(str(c) for c in r["curve"]) +
            f" | {r['norm']:.3f} | {r['norm_max']:.3f} | {r['spike']:.3f} | {kind} | {r['accuracy']:.2f} |"
            f" {r['drift']:.3f} | {r['risk']} | {r['verdict']} |"
        )
    (ROOT / "docs" / "forgetting.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
