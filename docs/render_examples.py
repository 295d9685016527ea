"""Render the example outputs in docs/ from a real audit, and screenshot the SVGs in a real browser.

    python docs/render_examples.py                       # audit two small models made here
    python docs/render_examples.py --model DIR --base DIR  # audit a real fine-tune (e.g. MiniLM)
    python docs/render_examples.py --report report.json    # render a saved report

Writes, into docs/ (or --out):

    example-card-section.md   the model-card section (embeds the badge and heatmap below)
    example-badge.svg         the badge              example-badge.png     its screenshot
    example-heatmap.svg       the heatmap            example-heatmap.png   its screenshot
    badge-endpoint.json       the shields.io endpoint JSON
    example-job-summary.md    the GitHub job summary

The screenshots come from headless Chromium (Debian: `apt-get install chromium`); look at them after a
change to a template: clipped text, overlapping labels and unreadable colours show there, not in tests.
Without Chromium the script writes the files, says so, and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftaudit import policy as policy_mod  # noqa: E402
from ftaudit.audit import AuditOptions  # noqa: E402
from ftaudit.check import Target, check  # noqa: E402
from ftaudit.renderers.badge import render_badge_svg, shields_endpoint  # noqa: E402
from ftaudit.renderers.card import render_card_section  # noqa: E402
from ftaudit.renderers.heatmap import render_heatmap_svg  # noqa: E402
from ftaudit.renderers.markdown import render_job_summary  # noqa: E402
from ftaudit.report import Report  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def example_report() -> Report:
    """A real audit of a small Llama-shaped model and a strong low-rank (LoRA-like) update of it."""
    from tests.models import llama_like, low_rank_update, write_model

    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path.cwd()
        os.chdir(tmp)  # so that the report names the models as below, not by a temporary path
        try:
            base = llama_like(layers=6, hidden=64, ffn=96)
            write_model(Path("example-org/llama-like-base"), base)
            write_model(Path("example-org/llama-like-lora"), low_rank_update(base, rank=4, scale=1.0))
            return check(Target("example-org/llama-like-lora", "example-org/llama-like-base"), AuditOptions(),
                         policy_mod.load(None))
        finally:
            os.chdir(cwd)


def screenshot(svg: Path, png: Path, scale: int) -> None:
    """Open the SVG in headless Chromium at its own size and save what it draws."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    root = ET.fromstring(svg.read_text(encoding="utf-8"))
    width, height = int(float(root.get("width"))), int(float(root.get("height")))
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--force-device-scale-factor={scale}", f"--screenshot={png}",
             f"--window-size={width},{height}", svg.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )
    if not png.exists():
        raise RuntimeError(f"Chromium wrote no screenshot of {svg}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a fine-tuned model folder (or Hub id) to audit")
    parser.add_argument("--base", help="its base model folder (or Hub id)")
    parser.add_argument("--report", type=Path, help="render this saved JSON report instead of auditing")
    parser.add_argument("--metric", default="intruders", help="what the heatmap shows (default: intruders)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where to write (default: docs/)")
    args = parser.parse_args()

    if args.report:
        report = Report.read(args.report)
    elif args.model:
        report = check(Target(args.model, args.base), AuditOptions(), policy_mod.load(None))
    else:
        report = example_report()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    badge, heatmap = out / "example-badge.svg", out / "example-heatmap.svg"
    badge.write_text(render_badge_svg(report), encoding="utf-8")
    heatmap.write_text(render_heatmap_svg(report, args.metric), encoding="utf-8")
    (out / "badge-endpoint.json").write_text(json.dumps(shields_endpoint(report), indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    (out / "example-card-section.md").write_text(
        render_card_section(report, badge_path=badge.name, heatmap_path=heatmap.name), encoding="utf-8")
    (out / "example-job-summary.md").write_text(render_job_summary(report), encoding="utf-8")
    print(f"{report.model.id}: {report.verdict.status}, {report.summary.intruder_dimensions} intruder dimensions; "
          f"wrote {out}/example-*.svg, example-*.md, badge-endpoint.json")
    try:
        screenshot(badge, out / "example-badge.png", scale=3)
        screenshot(heatmap, out / "example-heatmap.png", scale=2)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"no screenshots: {e}", file=sys.stderr)
        return 1
    print(f"screenshots: {out}/example-badge.png, {out}/example-heatmap.png (look at them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
