"""The `ftaudit` command line: parse, call the library, map failures to exit codes.

Exit codes (contract): 0 audited and passed (or warned), 1 audited and failed the policy,
2 could not audit. `fix` exits with the code of the audit of what it wrote, or 2 when it wrote nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import click

from ftaudit import __version__, cardfile, memory, policy as policy_mod
from ftaudit.audit import AuditOptions
from ftaudit.cli_parsing import FiniteRange, OneLineErrorGroup, Revision, Token
from ftaudit.cache import DEFAULT_MAX_BYTES, SpectrumCache, default_dir
from ftaudit.check import Target, check, check_audited
from ftaudit.errors import EXIT_ERROR, EXIT_FAIL, EXIT_PASS, FtauditError, UsageError
from ftaudit.files import check_writable, is_stream, write_text
from ftaudit.fix import FixOptions, fix
from ftaudit.pairing import KINDS, Selection
from ftaudit.progress import phase_displays, progress_display
from ftaudit.renderers import badge, card, heatmap, markdown, text
from ftaudit.renderers import fix as fix_render
from ftaudit.report import Report
from ftaudit.secrets import Redactor
from ftaudit.shards import Shard, join, warn_other_policy
from ftaudit.sources import is_here
from ftaudit.sources.checkpoint import PICKLE_SUFFIXES
from ftaudit.spectral import resolve_device

GIB = 1024**3
MODEL_FILES = ("config.json", "adapter_config.json", "README.md")
"""A model folder's files that the audit reads, besides its weights and their index."""
T = TypeVar("T")


def _run(debug: bool, redactor: Redactor, fn: Callable[[], T]) -> T:
    """Run `fn`; any failure becomes one redacted line on stderr and exit code 2."""
    error: BaseException
    try:
        return fn()
    except FtauditError as e:
        error, message = e, str(e)
    except KeyboardInterrupt as e:
        error, message = e, "interrupted"
    except Exception as e:  # noqa: BLE001 - the contract: never a traceback without --debug
        error, message = e, _out_of_memory(e) or (f"internal error ({type(e).__name__}: {str(e).strip()}); rerun with "
                                                  "--debug and report it")
    if debug:
        click.echo(redactor("".join(traceback.format_exception(error))), err=True)
    # a library's message can span lines: the contract is one
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    click.echo(_error_line(text.safe(redactor(one_line))), err=True)
    sys.exit(EXIT_ERROR)


def _out_of_memory(e: Exception) -> str | None:
    """What to say when `e` is running out of memory, not a bug: a matrix too large for this machine or its GPU. torch
    raises a RuntimeError of its own for the CPU's allocator, and torch.OutOfMemoryError for a GPU's."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return ("out of GPU memory: ftaudit holds a few tensors at a time on the GPU, each matrix in float64, and these "
                "do not fit there: run it with --device cpu, or on a GPU with more memory")
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
        return ("out of memory: ftaudit holds a few tensors at a time, each matrix in float64, and these do not fit "
                "here: run it on a machine with more memory")
    return None


def _error_line(message: str) -> str:
    """An error's one line; with --format github, as warnings are then, a workflow command, which GitHub shows on the
    run's page (else only the step's log would say why it failed)."""
    if any(isinstance(h.formatter, _AnnotatedWarnings) for h in logging.getLogger("ftaudit").handlers):
        return markdown.workflow_error(message)
    return f"ftaudit: error: {message}"


class _AnnotatedWarnings(logging.Formatter):
    """Log lines as usual, but warnings as workflow commands, which GitHub shows on the run's page (--format github)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.WARNING:
            return markdown.workflow_warning(record.getMessage())
        return super().format(record)


def _setup_logging(debug: bool, quiet: bool, annotate: bool, redactor: Redactor) -> None:
    handler = logging.StreamHandler(sys.stderr)
    line = "ftaudit: %(levelname)s: %(message)s"
    handler.setFormatter(_AnnotatedWarnings(line) if annotate else logging.Formatter(line))
    handler.addFilter(redactor.log_filter)
    handler.addFilter(_inert)
    handler.addFilter(_once())
    log = logging.getLogger("ftaudit")
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _inert(record: logging.LogRecord) -> bool:
    """A logging filter that makes the record's message inert on a terminal (`text.safe`): some hold what a model's
    files say, such as its config.json's model type."""
    record.msg = text.safe(record.getMessage())
    record.args = None
    return True


def _once() -> Callable[[logging.LogRecord], bool]:
    """A logging filter that lets each warning through once (the model and its base on one server that ignores
    Range requests, say, warn alike)."""
    seen: set[str] = set()

    def first(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if message in seen:
            return False
        seen.add(message)
        return True

    return first


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftaudit")
def main() -> None:
    """Audit what fine-tuning did to a base model: intruder dimensions and forgetting risk."""
    memory.return_large_blocks()


def run() -> None:
    """The `ftaudit` command: `main`, then an exit that skips the interpreter's teardown.

    Once the output is flushed nothing is left to do, and unloading torch's modules takes a
    quarter of a second, a tenth of a small audit.
    """
    _interrupt_on_sigterm()
    try:
        main()
        code: int | str | None = 0
    except SystemExit as e:
        code = e.code
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: closed when the command started (`>&-`)
                stream.flush()
        except OSError:  # a reader that has gone, such as `| head`
            pass
    os._exit(code)


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a cancelled CI job, `timeout`, `docker stop`) ends the command as Ctrl-C does: one line, exit code 2,
    and an unfinished `fix --out` removed. A SIGTERM the caller set to be ignored stays ignored."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)


Decorator = Callable[[Callable[..., None]], Callable[..., None]]


def _options(*options: Decorator) -> Decorator:
    """Several click options as one decorator, in the order given."""

    def apply(fn: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


_model_options = _options(
    click.argument("model"),
    click.option("--base", help="Base model (Hub id or folder). Default: the base the model declares."),
    click.option("--revision", type=Revision(), help="Revision of MODEL on the Hub (branch, tag or commit)."),
    click.option("--base-revision", type=Revision(), help="Revision of the base on the Hub."),
    click.option("--token", type=Token(), help="Hugging Face token. Default: HF_TOKEN, then the saved login."),
    click.option("--k", "k", type=click.IntRange(min=1), help="Top singular vectors examined per matrix [policy: 10]."),
    click.option("--epsilon", type=FiniteRange(0, 1, min_open=True), help="Intruder threshold [policy: 0.5]."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--include", multiple=True, metavar="KIND|GLOB",
                 help=f"Also analyse these module kinds ({', '.join(k for k in KINDS if k != 'norm')}) "
                 "or tensor-name globs; several: repeat the option or separate them by commas."),
    click.option("--exclude", multiple=True, metavar="GLOB",
                 help="Skip tensors whose names match; several: repeat the option or separate them by commas."),
    click.option("--allow-pickle", is_flag=True,
                 help="Load pickle weights (.bin) with torch.load(weights_only=True) when there is no safetensors."),
    click.option("--policy", "policy_path", type=click.Path(path_type=Path), help="Policy YAML (default: built in)."),
)
_run_options = _options(
    click.option("--no-cache", is_flag=True, help="Neither read nor write the base-spectrum cache."),
    click.option("--cache-size", type=FiniteRange(min=0, min_open=True), default=DEFAULT_MAX_BYTES / GIB,
                 show_default=True, envvar="FTAUDIT_CACHE_SIZE", metavar="GIB",
                 help="Cap on the base-spectrum cache in GiB, least recently used out first "
                 "(a Llama-2-7B-shaped base's spectra take about 14 GiB). Also FTAUDIT_CACHE_SIZE."),
    click.option("--quiet", is_flag=True, help="Print only warnings and errors: no report, no progress."),
    click.option("--debug", is_flag=True, help="Show tracebacks and request retries."),
)


@dataclass(frozen=True)
class _Setup:
    """What `check` and `fix` both make of their common options."""

    redactor: Redactor
    policy: policy_mod.Policy
    options: AuditOptions
    target: Target
    cache: SpectrumCache | None


def _setup(
    model: str, base: str | None, revision: str | None, base_revision: str | None, token: str | None,
    k: int | None, epsilon: float | None, device: str, include: tuple[str, ...], exclude: tuple[str, ...],
    allow_pickle: bool, policy_path: Path | None, no_cache: bool, cache_size: float, quiet: bool, debug: bool,
    outputs: dict[str, Path | None], annotate: bool = False,
) -> _Setup:
    """Also checks that every output file can be written, so that no error comes after the work. `annotate`: warnings
    as GitHub workflow commands."""
    redactor = Redactor.for_token(token)
    _setup_logging(debug, quiet, annotate, redactor)
    _run(debug, redactor, lambda: _check_writable(outputs))
    _run(debug, redactor, lambda: _check_not_read(outputs, {"MODEL": model, "--base": base}))
    _run(debug, redactor, lambda: resolve_device(device))  # before the models are looked up, on the Hub maybe
    policy = _run(debug, redactor, lambda: policy_mod.load(policy_path))
    options = AuditOptions(
        k=k or policy.k,
        epsilon=epsilon or policy.epsilon,
        device=device,
        selection=Selection.from_options(include, exclude),
    )
    target = Target(model, base, revision, base_revision, token, allow_pickle)
    # a cap of more bytes than a float holds (1e300 GiB) is no cap
    cache = None if no_cache else SpectrumCache(default_dir(), max_bytes=int(min(cache_size * GIB, sys.maxsize)))
    return _Setup(redactor, policy, options, target, cache)


def _log_cache(cache: SpectrumCache | None) -> None:
    if cache is not None:
        logging.getLogger("ftaudit").debug(
            "base-spectrum cache %s: %d hits, %d misses", cache.directory, cache.hits, cache.misses)


_output_options = _options(
    click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the JSON report here."),
    click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown", "github"]), default="text",
                 show_default=True, help="What goes to stdout; github: annotations, step summary and outputs."),
    click.option("--card", "card_path", type=click.Path(path_type=Path), help="Write the model-card section here."),
    click.option("--badge", "badge_path", type=click.Path(path_type=Path), help="Write the SVG badge here."),
    click.option("--badge-json", "badge_json_path", type=click.Path(path_type=Path),
                 help="Write the shields.io endpoint JSON here."),
    click.option("--heatmap", "heatmap_path", type=click.Path(path_type=Path), help="Write the SVG heatmap here."),
    click.option("--push", is_flag=True, help="Open a pull request with the card, badge and heatmap on the Hub repo."),
    click.option("--push-mode", type=click.Choice(["pr", "commit"]), default="pr", show_default=True,
                 help="commit: commit to the branch directly instead of opening a pull request."),
)


@dataclass(frozen=True)
class _Outputs:
    """Where a report goes: files, the Hub, stdout."""

    json_path: Path | None
    fmt: str
    card_path: Path | None
    badge_path: Path | None
    badge_json_path: Path | None
    heatmap_path: Path | None
    push: bool
    push_mode: str

    @property
    def files(self) -> dict[str, Path | None]:
        """The output files, by the option that names each."""
        return {"--json": self.json_path, "--card": self.card_path, "--badge": self.badge_path,
                "--badge-json": self.badge_json_path, "--heatmap": self.heatmap_path}

    @property
    def of_the_model(self) -> list[str]:
        """The options that show the model as a whole: not for one shard's report."""
        given = {"--card": self.card_path, "--badge": self.badge_path, "--badge-json": self.badge_json_path,
                 "--heatmap": self.heatmap_path, "--push": self.push}
        return [option for option, value in given.items() if value]


def _check_writable(files: dict[str, Path | None]) -> None:
    """Fail now where an output file given could not be written afterwards (`check_writable`), or where two options
    name one file, which would end up holding only the output written last (a pipe or device, such as /dev/null, can
    take several)."""
    named: dict[str, str] = {}
    for option, path in files.items():
        if path is None:
            continue
        check_writable(path)
        same = named.setdefault(os.path.realpath(path), option)
        if same != option and not is_stream(path):
            raise UsageError(f"{path}: both {same} and {option} name this file, which would keep only one of them; "
                             f"choose another file for {option}")


def _check_not_read(files: dict[str, Path | None], folders: dict[str, str | None]) -> None:
    """Fail now where an output file given is, or would be, one that the audit reads from a model folder here (its
    weights, their index, config.json, adapter_config.json or card): writing the output would destroy it, or change
    the model."""
    here = {option: Path(os.path.realpath(folder)) for option, folder in folders.items()
            if folder is not None and os.path.isdir(folder)}
    for option, path in files.items():
        if path is None or is_stream(path):
            continue
        real = Path(os.path.realpath(path))
        for given, folder in here.items():
            if real.parent == folder and _read_by_audit(real.name):
                raise UsageError(f"{path}: {option} names {real.name} of the folder given as {given}, which the audit "
                                 f"reads and the output would replace; choose another file for {option}")


def _read_by_audit(name: str) -> bool:
    """Whether a model folder's file `name` is one the audit reads."""
    return name.endswith((".safetensors", ".safetensors.index.json", *PICKLE_SUFFIXES)) or name in MODEL_FILES


def _check_github_files(fmt: str) -> None:
    """With --format github, the files GitHub Actions names for the outputs and the job summary, checked before the
    work as the output files are: a runner that cannot take them fails the step before the audit, not after it."""
    if fmt != "github":
        return
    for name in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY"):
        if path := os.environ.get(name):
            check_writable(Path(path), "GitHub Actions output")


def _emit(report: Report, outputs: _Outputs, token: str | None, quiet: bool, debug: bool, redactor: Redactor) -> None:
    """Write, print and push the judged report as `outputs` say, then exit with its verdict's code. The push comes
    last: when it fails (exit code 2), the files, the GitHub outputs and job summary and stdout have the verdict."""
    json_path = outputs.json_path
    if json_path is not None:
        _run(debug, redactor, lambda: report.write(json_path))
    files = {outputs.card_path: lambda: card.render_card_section(report),
             outputs.badge_path: lambda: badge.render_badge_svg(report),
             outputs.badge_json_path: lambda: json.dumps(badge.shields_endpoint(report)) + "\n",
             outputs.heatmap_path: lambda: heatmap.render_heatmap_svg(report)}
    for path, make in files.items():
        if path is not None:
            _run(debug, redactor, lambda: write_text(path, make()))
    if outputs.push or outputs.fmt == "github":
        from ftaudit import publish  # the Hub client: imported only when needed, to keep start-up short
    if outputs.fmt == "github":
        _run(debug, redactor, lambda: publish.write_github_outputs(report, outputs.json_path))
    if not quiet:
        _run(debug, redactor, lambda: _print(redactor(_stdout(report, outputs.fmt))))
    if outputs.push:
        pushed = _run(debug, redactor, lambda: publish.push_card(report, token=token, mode=outputs.push_mode))
        logging.getLogger("ftaudit").info("%s", pushed)
    sys.exit(EXIT_FAIL if report.verdict.status == "fail" else EXIT_PASS)


@main.command("check")
@_model_options
@_output_options
@click.option("--shard", metavar="I/N",
              help="Audit only the I-th of N parts of the matrices, balanced by work, for N jobs side by side; "
              "`ftaudit merge` joins their reports.")
@_run_options
def check_command(
    model: str, base: str | None, revision: str | None, base_revision: str | None, token: str | None,
    k: int | None, epsilon: float | None, device: str, include: tuple[str, ...], exclude: tuple[str, ...],
    allow_pickle: bool, policy_path: Path | None, json_path: Path | None, fmt: str, card_path: Path | None,
    badge_path: Path | None, badge_json_path: Path | None, heatmap_path: Path | None, push: bool, push_mode: str,
    shard: str | None, no_cache: bool, cache_size: float, quiet: bool, debug: bool,
) -> None:
    """Audit MODEL (a Hub repo id or a local folder) against its base."""
    outputs = _Outputs(json_path, fmt, card_path, badge_path, badge_json_path, heatmap_path, push, push_mode)
    setup = _setup(model, base, revision, base_revision, token, k, epsilon, device, include, exclude, allow_pickle,
                   policy_path, no_cache, cache_size, quiet, debug, outputs.files, annotate=fmt == "github")
    redactor = setup.redactor
    _run(debug, redactor, lambda: _check_github_files(fmt))
    options = setup.options
    if shard is not None:
        options = replace(options, shard=_run(debug, redactor, lambda: _shard(shard, outputs)))
    if push:
        _run(debug, redactor, lambda: _refuse_push(model))
    progress, close = progress_display("Auditing") if not quiet else (None, lambda: None)
    try:
        report = _run(debug, redactor, lambda: check(setup.target, options, setup.policy, progress, setup.cache))
    finally:
        close()
    _log_cache(setup.cache)
    _emit(report, outputs, token, quiet, debug, redactor)


def _shard(text: str, outputs: _Outputs) -> Shard:
    """The shard `--shard` names, where no output that shows the whole model is asked for."""
    given = outputs.of_the_model
    if given:
        raise UsageError(f"{', '.join(given)} {'shows' if len(given) == 1 else 'show'} the whole model, but a shard's "
                         "report covers part of it: give it to `ftaudit merge`, which joins the shards' reports")
    return Shard.parse(text)


@main.command("merge")
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), help="Policy YAML (default: built in).")
@_output_options
@click.option("--token", type=Token(), help="Hugging Face token, for --push. Default: HF_TOKEN, then the saved login.")
@click.option("--quiet", is_flag=True, help="Print only warnings and errors: no report.")
@click.option("--debug", is_flag=True, help="Show tracebacks and request retries.")
def merge_command(
    reports: tuple[Path, ...], policy_path: Path | None, json_path: Path | None, fmt: str, card_path: Path | None,
    badge_path: Path | None, badge_json_path: Path | None, heatmap_path: Path | None, push: bool, push_mode: str,
    token: str | None, quiet: bool, debug: bool,
) -> None:
    """Join the JSON reports of `ftaudit check --shard I/N`, every shard's, into the report of the whole audit, and
    judge it under the policy (its k and epsilon are those the shards measured with)."""
    outputs = _Outputs(json_path, fmt, card_path, badge_path, badge_json_path, heatmap_path, push, push_mode)
    redactor = Redactor.for_token(token)
    _setup_logging(debug, quiet, fmt == "github", redactor)
    _run(debug, redactor, lambda: _check_writable(outputs.files))
    _run(debug, redactor, lambda: _check_github_files(fmt))
    policy = _run(debug, redactor, lambda: policy_mod.load(policy_path))
    shards = _run(debug, redactor, lambda: [(str(path), Report.read(path)) for path in reports])
    report = _run(debug, redactor, lambda: join(shards))
    _run(debug, redactor, lambda: check_audited(report))
    if push:
        _run(debug, redactor, lambda: _refuse_push(report.model.id, local=report.model.revision is None))
    policy_mod.apply(policy, report)
    warn_other_policy(shards, policy_mod.applied(policy))
    _emit(report, outputs, token, quiet, debug, redactor)


def _refuse_push(model: str, local: bool = False) -> None:
    """--push of a local folder (`local`: audited as one, though it may not be here), or in offline mode, fails before
    the audit, not after it."""
    from huggingface_hub import constants

    if local or is_here(Path(model).expanduser()):
        raise UsageError(f"--push needs a Hub repository: {model} is a local folder")
    if constants.is_offline_mode():
        raise UsageError("--push writes to the Hub, which HF_HUB_OFFLINE turns off")


def _print(text: str, nl: bool = True) -> None:
    """Write to stdout. A reader that has gone (`| head`) is not an error: the exit code stays the verdict's; a stdout
    that cannot be written (a full disk) is one (UsageError)."""
    try:
        click.echo(text, nl=nl)
    except BrokenPipeError:
        pass
    except OSError as e:
        raise UsageError(f"cannot write to stdout ({e.strerror})") from None


def _stdout(report: Report, fmt: str) -> str:
    if fmt == "json":
        return report.to_json().rstrip("\n")
    if fmt == "markdown":
        return markdown.render_job_summary(report)
    if fmt == "github":
        return "\n".join(markdown.github_annotations(report))
    return text.render(report)


@main.command("fix")
@_model_options
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Folder to write the patched model to; must not exist, or be empty.")
@click.option("--lambda", "lam", type=FiniteRange(0, 1), default=0.75, show_default=True,
              help="Scale each intruder's singular value by this (1: unchanged, 0: removed).")
@click.option("--only-top", type=click.IntRange(min=1), metavar="N",
              help="Scale only the N intruders of largest singular value in each matrix.")
@click.option("--merge", is_flag=True, help="For a LoRA adapter: write the merged model instead of an adapter.")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Write the fix record (settings, changes, audits before and after) here.")
@click.option("--card", "card_path", type=click.Path(path_type=Path),
              help="Also write the card section (audit of the output and the fix) here.")
@_run_options
def fix_command(
    model: str, base: str | None, revision: str | None, base_revision: str | None, token: str | None,
    k: int | None, epsilon: float | None, device: str, include: tuple[str, ...], exclude: tuple[str, ...],
    allow_pickle: bool, policy_path: Path | None, out: Path, lam: float, only_top: int | None, merge: bool,
    json_path: Path | None, card_path: Path | None, no_cache: bool, cache_size: float, quiet: bool, debug: bool,
) -> None:
    """Scale down MODEL's intruder dimensions and write the patched model to --out, then audit it.

    Exit code: that of `ftaudit check` on the output (0 pass or warn, 1 fail), 2 when nothing was written.
    """
    setup = _setup(model, base, revision, base_revision, token, k, epsilon, device, include, exclude, allow_pickle,
                   policy_path, no_cache, cache_size, quiet, debug, {"--json": json_path, "--card": card_path})
    redactor = setup.redactor
    _run(debug, redactor, lambda: _check_not_out(out, {"--json": json_path, "--card": card_path}))
    phases, close = phase_displays() if not quiet else (None, lambda: None)
    fix_options = FixOptions(lam=lam, only_top=only_top, merge=merge)
    try:
        result = _run(debug, redactor, lambda: fix(
            setup.target, out, setup.options, fix_options, setup.policy, phases, setup.cache))
    finally:
        close()
    _log_cache(setup.cache)
    if json_path is not None:
        _run(debug, redactor, lambda: result.write(json_path))
    if card_path is not None:
        _run(debug, redactor, lambda: write_text(card_path, fix_render.render_card_section(result)))
    if not quiet:
        _run(debug, redactor, lambda: _print(redactor(fix_render.render_text(result))))
    sys.exit(EXIT_FAIL if result.after.verdict.status == "fail" else EXIT_PASS)


def _check_not_out(out: Path, files: dict[str, Path | None]) -> None:
    """Refuse now a file option naming the --out folder, which would fail only once the model is written, or a file
    in it, written into the finished model (over its card or weights, maybe) after its audit."""
    for option, path in files.items():
        if path is not None and path.resolve() == out.resolve():
            raise UsageError(f"{path}: {option} names the --out folder; choose another file")
        if path is not None and out.resolve() in path.resolve().parents:
            raise UsageError(f"{path}: {option} is inside the --out folder, which is to hold the fixed model only; "
                             "choose a file outside it")


@main.group("card")
def card_group() -> None:
    """Model-card sections from saved reports."""


@card_group.command("update")
@click.argument("card_file", type=click.Path(path_type=Path))
@click.option("--report", "report_path", required=True, type=click.Path(path_type=Path),
              help="A JSON report written by `ftaudit check --json`.")
@click.option("--badge", "badge_link", help="Relative path of the badge to show in the section.")
@click.option("--heatmap", "heatmap_link", help="Relative path of the heatmap to show in the section.")
def card_update(card_file: Path, report_path: Path, badge_link: str | None, heatmap_link: str | None) -> None:
    """Put the audit section into CARD_FILE (a README.md), replacing an earlier one in place."""
    redactor = Redactor.for_token(None)
    _setup_logging(False, False, False, redactor)

    def update() -> None:
        report = Report.read(report_path)
        shard = report.settings.shard
        if shard is not None:
            raise UsageError(f"{report_path}: the report of shard {shard.get('index')}/{shard.get('count')}, which "
                             "covers part of the model, but a card shows the whole model: give every shard's report "
                             "to `ftaudit merge` and the merged one to `card update`")
        section = card.render_card_section(report, badge_path=badge_link, heatmap_path=heatmap_link)
        cardfile.update_card_file(card_file, section, cardfile.card_data_from_report(report))

    _run(False, redactor, update)


@main.command("policy")
def policy_command() -> None:
    """Print the default policy, to copy and edit."""
    _run(False, Redactor.for_token(None), lambda: _print(policy_mod.default_text(), nl=False))
