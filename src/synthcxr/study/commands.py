"""`synthcxr study ...`: create, serve, add-reader, reissue, admin-token, revoke-admin-tokens, status, export,
analyze, simulate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True)

DbOpt = Annotated[str | None, typer.Option("--db", help="Database URL (default: SYNTHCXR_STUDY_DB or sqlite:///synthcxr-study/study.sqlite3); postgresql://... works.")]
BaseUrlOpt = Annotated[str | None, typer.Option("--base-url", help="Address readers use; invite links are printed with it.")]


def _settings(db: str | None = None, **kw: object):  # noqa: ANN202 - StudySettings
    from synthcxr.study.settings import load_settings

    return load_settings(db=db, **kw)


@app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="Study name (unique in the database).")],
    real: Annotated[list[Path] | None, typer.Option("--real", help="Folder of real control images (repeatable).")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", help="Run directory or generation folder, optionally NAME=PATH (repeatable).")] = None,
    per_model: Annotated[int, typer.Option("--per-model", help="Images sampled per model.")] = 30,
    real_count: Annotated[int, typer.Option("--real-count", help="Real control images sampled.")] = 30,
    readers: Annotated[int, typer.Option("--readers", help="Number of readers (each gets a one-time invite link).")] = 3,
    repeats: Annotated[int, typer.Option("--repeats", help="Images each reader sees twice (intra-reader agreement).")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling the images (reading orders come from a secret stored with the study).")] = 0,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Side of the square images readers see (default: the smallest side of all chosen images, at most 512).")] = None,
    allow_enlarge: Annotated[bool, typer.Option("--allow-enlarge", help="Enlarge images smaller than --image-size instead of refusing (a warning is printed; enlarged images can unblind the study).")] = False,
    questions: Annotated[Path | None, typer.Option("--questions", help="YAML questionnaire (see QuestionsConfig).")] = None,
    finding: Annotated[bool | None, typer.Option("--finding/--no-finding", help="Ask for the finding (TB / normal / unsure).")] = None,
    comment: Annotated[bool | None, typer.Option("--comment/--no-comment", help="Offer a comment box.")] = None,
    design: Annotated[str, typer.Option("--design", help="single (one image at a time, rated) or paired (a real and a synthetic image side by side: which one is synthetic?).")] = "single",
    calibration: Annotated[int, typer.Option("--calibration", help="Calibration images (pairs) shown first, each followed by the right answer; drawn apart from the study images and never analysed.")] = 0,
    counterbalance: Annotated[bool, typer.Option("--counterbalance", help="Show each model's images as one block, block order per reader from a Latin square.")] = False,
    max_image_size: Annotated[int, typer.Option("--max-image-size", help="Cap of the automatic image size (1024 serves sources that large at 1024 px; smaller ones are never enlarged).")] = 512,
    directory: Annotated[Path | None, typer.Option("--dir", help="Folder for the blinded images (default: SYNTHCXR_STUDY_DIR or ./synthcxr-study).")] = None,
    db: DbOpt = None,
    base_url: BaseUrlOpt = None,
) -> None:
    """Blind and store the images, create readers, print their invite links."""
    from synthcxr.config import load_config
    from synthcxr.study.questions import QuestionsConfig
    from synthcxr.study.service import create_study

    settings = _settings(db, dir=directory, base_url=base_url)
    overrides = [f"{k}={str(v).lower()}" for k, v in (("finding", finding), ("comment", comment)) if v is not None]
    q = load_config(QuestionsConfig, questions, overrides)
    created = create_study(settings.db, name, real=real or None, models=model or [], per_model=per_model,
                           real_count=real_count, readers=readers, seed=seed, questions=q, repeats=repeats,
                           image_size=image_size, study_dir=settings.dir, base_url=settings.base_url,
                           allow_enlarge=allow_enlarge, design=design, calibration=calibration,
                           counterbalance=counterbalance, max_image_size=max_image_size)
    typer.echo(f"study {created.name!r}: {created.n_images} images "
               f"({', '.join(f'{g} {n}' for g, n in sorted(created.groups.items()))}), "
               f"{created.n_tasks_per_reader} {'pairs ' if design == 'paired' else ''}per reader"
               f"{f' ({calibration} for calibration)' if calibration else ''}, shown at {created.blinding['image_size']} px")
    for line in _blinding_lines(created.blinding):
        typer.echo(line)
    typer.echo("One-time invite links (send each reader their own; they are not shown again):")
    for reader, link in created.invites.items():
        typer.echo(f"  {reader}: {link}")
    if created.admin_token:
        typer.echo(f"Admin token (keep it secret): {created.admin_token}   sign in at {settings.base_url}/admin/login")


def _blinding_lines(info: dict) -> list[str]:
    """Source sizes and framing per group, then the leak check, as printed by `study create`."""
    lines = ["source images:"]
    for group, g in sorted(info["groups"].items()):
        sizes = ", ".join(f"{size} ({n})" for size, n in g["sizes"].items())
        if g["distinct_sizes"] > len(g["sizes"]):
            sizes += f", ... ({g['distinct_sizes']} sizes)"
        extra = [f"{g[k]} {label}" for k, label in (("enlarged", "enlarged"), ("cropped", "cropped to a square"),
                                                    ("padded", "with uniform edge bars")) if g[k]]
        lines.append(f"  {group}: {g['n']} images, {sizes}" + "".join(f", {e}" for e in extra))
    check = info["leak_check"]
    if check.get("skipped"):
        lines.append(f"leak check skipped: {check['skipped']}")
        return lines
    lines.append(f"leak check (AUC real vs model per feature; 0.5 = no separation, 1 = full; warning above "
                 f"{check['threshold']}):")
    for group, res in check["models"].items():
        if res["max_auc"] is None:
            lines.append(f"  {group}: too few images ({res['n_model']})")
            continue
        flag = "  WARNING" if res["max_auc"] > check["threshold"] else ""
        aucs = ", ".join(f"{f} {v:.2f}" for f, v in res["auc"].items())
        lines.append(f"  {group}: max AUC {res['max_auc']:.2f} ({res['max_feature']}, permutation p = "
                     f"{res['p_value']:.3f}); {aucs}{flag}")
    return lines


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (0.0.0.0 for the whole network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port.")] = 8000,
    new_admin_token: Annotated[bool, typer.Option("--new-admin-token", help="Print a new admin token even if one is still valid.")] = False,
    revoke_old: Annotated[bool, typer.Option("--revoke-old", help="Revoke every older admin token and admin session, print a new token.")] = False,
    db: DbOpt = None,
) -> None:
    """Run the reader web app. Prints an admin token only when none is valid (or when asked to)."""
    from synthcxr.study.server import serve as run_server
    from synthcxr.study.service import active_admin_token_expiry, ensure_db, serve_admin_token

    settings = _settings(db)
    ensure_db(settings.db)
    login = f"http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}/admin/login"
    token = serve_admin_token(settings.db, new=new_admin_token, revoke_old=revoke_old,
                              valid_days=settings.admin_token_days)
    if token is not None:
        typer.echo(f"Admin sign-in: {login}  token (valid {settings.admin_token_days:g} days, keep it secret): {token}")
    else:
        expiry = active_admin_token_expiry(settings.db, settings.admin_token_days)
        typer.echo(f"Admin sign-in: {login}  with the admin token printed before (valid until "
                   f"{expiry:%Y-%m-%d %H:%M} UTC; --new-admin-token prints another, --revoke-old replaces all)")
    run_server(settings, host=host, port=port)


@app.command("add-reader")
def add_reader_cmd(
    name: Annotated[str, typer.Argument(help="Study name.")],
    reader_name: Annotated[str | None, typer.Option("--reader-name", help="Name shown to the admin (default reader-N).")] = None,
    db: DbOpt = None,
    base_url: BaseUrlOpt = None,
) -> None:
    """Add one reader to a study and print their one-time invite link."""
    from synthcxr.study.service import add_reader

    settings = _settings(db, base_url=base_url)
    typer.echo(add_reader(settings.db, name, reader_name, base_url=settings.base_url))


@app.command("reissue")
def reissue(
    name: Annotated[str, typer.Argument(help="Study name.")],
    reader_name: Annotated[str, typer.Argument(help="Reader whose link was lost (answers are kept).")],
    db: DbOpt = None,
    base_url: BaseUrlOpt = None,
) -> None:
    """Give a reader a new one-time link (their old link and sessions stop working)."""
    from synthcxr.study.service import reissue_invite

    settings = _settings(db, base_url=base_url)
    typer.echo(reissue_invite(settings.db, name, reader_name, base_url=settings.base_url))


@app.command("admin-token")
def admin_token(
    revoke_old: Annotated[bool, typer.Option("--revoke-old", help="Revoke every older admin token and admin session.")] = False,
    db: DbOpt = None,
) -> None:
    """Print a new admin sign-in token (valid SYNTHCXR_STUDY_ADMIN_TOKEN_DAYS days, default 7)."""
    from synthcxr.study.service import new_admin_token

    typer.echo(new_admin_token(_settings(db).db, revoke_old=revoke_old))


@app.command("revoke-admin-tokens")
def revoke_admin_tokens_cmd(db: DbOpt = None) -> None:
    """Invalidate every admin token and sign out every admin (readers are not affected)."""
    from synthcxr.study.service import revoke_admin_tokens

    n = revoke_admin_tokens(_settings(db).db)
    typer.echo(f"{n} admin token(s) revoked; `synthcxr study serve` or `synthcxr study admin-token` prints a new one")


@app.command("status")
def status(
    name: Annotated[str | None, typer.Argument(help="Study name (default: all studies).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    db: DbOpt = None,
) -> None:
    """Progress of every reader."""
    from synthcxr.study.service import study_status

    result = study_status(_settings(db).db, name)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for s in result:
        done = sum(r["answered"] for r in s["readers"])
        total = sum(r["total"] for r in s["readers"])
        typer.echo(f"{s['study']}: {s['images']} images, {done}/{total} answers")
        for r in s["readers"]:
            joined = "joined" if r["joined"] else "not joined"
            typer.echo(f"  {r['reader']}: {r['answered']}/{r['total']} ({joined}, last {r['last_answer'] or '-'})")


@app.command("export")
def export(
    name: Annotated[str, typer.Argument(help="Study name.")],
    out: Annotated[Path, typer.Option("--out", help="CSV file to write (never overwritten).")],
    mrmc: Annotated[bool, typer.Option("--mrmc", help="Write the MRMC long format (reader, case, modality, truth, rating) that R's MRMCaov and iMRMC read, without calibration answers and repeats.")] = False,
    db: DbOpt = None,
) -> None:
    """Write every answer (unblinded: with source and model) as CSV."""
    from synthcxr.study.service import export_ratings

    typer.echo(export_ratings(_settings(db).db, name, out, mrmc=mrmc))


@app.command("analyze")
def analyze(
    name: Annotated[str, typer.Argument(help="Study name.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for analysis.json, CSV tables and plots.")],
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples.")] = 2000,
    delta: Annotated[float, typer.Option("--delta", help="Equivalence margin: a model counts as indistinguishable from real when the readers' AUC is shown to lie within 0.5 +- delta (TOST, alpha 0.05).")] = 0.05,
    db: DbOpt = None,
) -> None:
    """Realism per model with CIs, reader accuracy/AUC, MRMC AUC with equivalence test, agreement,
    time per case, mixed model, pairwise tests, plots."""
    from synthcxr.study.service import analyze_study

    if not 0 < delta < 0.5:
        from synthcxr.errors import StudyError

        raise StudyError(f"--delta {delta} is out of range", fix="use a margin between 0 and 0.5, e.g. --delta 0.05")
    result = analyze_study(_settings(db).db, name, out, seed=seed, n_boot=n_boot, delta=delta)
    for g in result["groups"]:
        lo, hi = g["realism_ci"] if g["realism_mean"] is not None else (None, None)
        mean = f"{g['realism_mean']:.2f} [{lo:.2f}, {hi:.2f}]" if g["realism_mean"] is not None else "-"
        real = f"{g['judged_real_fraction']:.2f}" if g["judged_real_fraction"] is not None else "-"
        typer.echo(f"{g['group']:>24}: realism {mean}, judged real {real} (n={g['n_ratings']})")
    mrmc = result.get("mrmc") or {}
    for m in mrmc.get("models", []):
        typer.echo(_mrmc_line(m, mrmc["delta"]))
    if mrmc.get("skipped"):
        typer.echo(f"MRMC analysis skipped: {mrmc['skipped']}")
    typer.echo(f"tables and plots in {out}")


def _num(value: Any, spec: str) -> str:
    """A statistic for the terminal; JSON turns NaN/inf (zero variance, one reader) into None."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a" if value is None or math.isnan(value) else str(value)
    return format(value, spec)


def _mrmc_line(m: dict[str, Any], delta: float) -> str:
    verdict = "indistinguishable" if m["equivalent"] else "not shown indistinguishable"
    lo, hi = m["ci"] if m.get("ci") else (None, None)
    return (f"{m['model']:>24}: MRMC AUC {_num(m['auc'], '.3f')} [{_num(lo, '.3f')}, {_num(hi, '.3f')}] "
            f"(df {_num(m['df'], '.1f')}), {verdict} (TOST p = {_num(m['tost_p'], '.3f')}) within 0.5 +- {delta}")


@app.command("simulate")
def simulate(
    name: Annotated[str, typer.Argument(help="Study name.")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
    db: DbOpt = None,
) -> None:
    """Fill every open task with made-up answers (demo/testing only; never on a real study)."""
    from synthcxr.study.service import simulate_answers

    typer.echo(f"{simulate_answers(_settings(db).db, name, seed=seed)} simulated answers added")
