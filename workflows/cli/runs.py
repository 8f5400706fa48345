"""Run commands: validate a config, the demo, the whole workflow and its single stages."""

from __future__ import annotations

from pathlib import Path

import click

from components.config import dump_config, load_config
from workflows.cli.app import (
    DEMO_CONFIG,
    REPRODUCE_CONFIG,
    RegistryChoice,
    UserError,
    cli,
    int_list,
    parse_overrides,
    run_stage,
    workflow_errors,
)


@cli.group()
def config() -> None:
    """Validate or show a run config (YAML with ${ENV} interpolation)."""


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_validate(file: Path) -> None:
    """Check FILE; on error print each bad key's path (and line) and exit 2."""
    cfg = load_config(file)
    from components.config import ConfigError
    from components.data.validate import source_issues

    issues = source_issues(cfg.data, cfg.languages.all)
    if issues:
        raise ConfigError(issues, str(file))
    click.echo(f"{file}: valid (run '{cfg.run_name}', original "
               f"{', '.join(cfg.languages.original)}; new {', '.join(cfg.languages.new)})")


@config.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_show(file: Path) -> None:
    """Print FILE resolved: environment substituted, defaults filled in, secrets masked."""
    click.echo(dump_config(load_config(file)), nl=False)


@cli.group(invoke_without_command=True)
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              default=DEMO_CONFIG, show_default="workflows/configs/demo.yaml",
              help="Run config of the demo.")
@click.pass_context
def demo(ctx: click.Context, config_file: Path) -> None:
    """Run the main job on the embedded default: the synthetic world, local Ray and MLflow.

    Without a subcommand: every stage that exists so far, tracked in MLflow under runs/.
    """
    if ctx.invoked_subcommand is not None:
        return
    from workflows.demo import run_demo

    with workflow_errors():
        result = run_demo(config_file)
    click.echo(result.summary())


@demo.command("world")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (built atomically; skipped if already complete).")
@click.option("--seed", default=0, show_default=True, help="World seed: same seed, same bytes.")
@click.option("--arch", type=RegistryChoice("components.moe.families:DENSE_TYPES"),
              default="llama",
              show_default=True, help="Architecture of the tiny model.")
@click.option("--people", "num_people", default=None, type=int, help="Number of entities.")
@click.option("--docs", "docs_per_language", default=None, type=int,
              help="Documents per language.")
@click.option("--vocab-size", default=None, type=int, help="Tokenizer vocabulary size.")
def demo_world(out_dir: Path, seed: int, arch: str, num_people: int | None,
               docs_per_language: int | None, vocab_size: int | None) -> None:
    """Generate the synthetic multilingual world, its tokenizer and a tiny base model."""
    from components.config import WorldConfig
    from components.storage import StageDir
    from workflows.world import ensure_world

    overrides = {k: v for k, v in {"num_people": num_people, "vocab_size": vocab_size,
                                   "docs_per_language": docs_per_language}.items()
                 if v is not None}
    world = WorldConfig(seed=seed, arch=arch, **overrides)
    manifest, built = ensure_world(StageDir(str(out_dir.resolve())), world,
                                   refuse_foreign=True)
    state = "built" if built else "already complete, skipped"
    click.echo(f"world {state}: {out_dir} ({len(manifest.outputs)} files, "
               f"{manifest.total_bytes / 1e6:.1f} MB)")


@cli.command("run")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--from", "from_stage", default=None, metavar="STAGE",
              help="Start at STAGE (earlier stages must be complete).")
@click.option("--only", "only", multiple=True, metavar="STAGE",
              help="Run only STAGE (repeatable).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path).")
def run_command(config: Path, from_stage: str | None, only: tuple[str, ...],
                overrides: tuple[str, ...]) -> None:
    """Run the whole expansion of CONFIG as a DAG of stages on Ray, building what is missing.

    Stages (or groups of them, for --from/--only): world, base_data, base, post (a
    synthetic-world run makes its own model pair), data, upcycle, cpt_moe, graft, baselines,
    evaluate, report; or a single node such as cpt_dense or eval_deltamoe. Independent branches
    run at once; each stage is skipped when its manifest matches; MLflow holds one parent run
    with a child per stage. A failed stage blocks only what needs it: the others finish, the
    summary shows every stage's state, and the exit status is 2 (bad input) or 1.
    """
    from workflows.expand import run_workflow, select_stages

    if from_stage and only:
        raise UserError("give --from or --only, not both")
    cfg = load_config(config, overrides=parse_overrides(overrides))
    try:
        select_stages(cfg, from_stage, only)
    except ValueError as err:
        raise UserError(str(err)) from None
    with workflow_errors():
        result = run_workflow(cfg, from_stage=from_stage, only=only)
    click.echo(result.summary())


@cli.command("evaluate")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Pre-staged local data for every task (<dir>/<task>/<split>.jsonl, "
                   "flores200/devtest/<tag>.parquet, perplexity/<tag>.jsonl).")
@click.option("--variant", "variants", multiple=True, metavar="NAME",
              help="Evaluate only this variant (repeatable; default: every one in the run).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many items per task and language.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path).")
def evaluate(config: Path, data_dir: str | None, variants: tuple[str, ...], limit: int | None,
             overrides: tuple[str, ...]) -> None:
    """Evaluate every model variant of CONFIG's run on its suites, per language.

    Results go to runs/<run>/eval/<variant>.json, MLflow (a run per variant tagged
    variant=NAME, tables and plots in the evaluate run); prints the comparison of original- and
    expanded-language averages. Unchanged variants are read back, not re-evaluated.
    """
    from workflows.expand import run_evaluation

    extra: dict[str, object] = {}
    if data_dir:
        extra["evaluation.data_dir"] = str(Path(data_dir).resolve())
    if variants:
        extra["evaluation.variants"] = list(variants)
    if limit:
        extra["evaluation.limit"] = limit
    cfg = load_config(config, overrides={**parse_overrides(overrides), **extra})
    with workflow_errors():
        result = run_evaluation(cfg)
    click.echo(result.table or "no results")
    click.echo(f"results: {result.run_dir}/eval")


@cli.command("data")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path).")
def data_command(config: Path, overrides: tuple[str, ...]) -> None:
    """Read, language-tag, filter, dedup, tokenize, mix and pack the corpora into ``data/``."""
    from components.storage import RunDir
    from workflows.data_stage import STAGE, complete_data_manifest

    cfg = load_config(config, overrides=parse_overrides(overrides))
    done = complete_data_manifest(cfg, RunDir(cfg.storage.root, cfg.run_name,
                                              cfg.storage.storage_options))
    if done is not None:  # a finished stage: answered before Ray starts
        run_dir, manifest, built = (RunDir(cfg.storage.root, cfg.run_name,
                                           cfg.storage.storage_options), done, False)
    else:
        run_dir, manifest, built = run_stage(config, overrides, "data", STAGE)
    where = run_dir.stage(STAGE).uri
    if not built:
        click.echo(f"{where}: already complete, skipped")
    stats = manifest.extra.get("data", {})
    click.echo(f"{where}: sequences of {stats.get('seq_len')} tokens")
    for lang in stats.get("languages", []):
        click.echo(f"  {lang}: {stats['documents_in'].get(lang, 0)} → "
                   f"{stats['documents_out'].get(lang, 0)} documents; "
                   f"{stats['tokens_train'].get(lang, 0)} train + "
                   f"{stats['tokens_validation'].get(lang, 0)} validation tokens; share "
                   f"{stats['share_realized'].get(lang, 0.0):.3f} (asked "
                   f"{stats['share_requested'].get(lang, 0.0):.3f})")


@cli.command("train")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--variant", type=RegistryChoice("workflows.train_stage:TRAINING_VARIANTS"),
              default="cpt_moe", show_default=True, help="The variant whose training to run.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path).")
def train_command(config: Path, variant: str, overrides: tuple[str, ...]) -> None:
    """Continued pre-training on Ray Train (FSDP2); resumes from the last checkpoint."""
    from components.variants import get_variant

    v = get_variant(variant)
    stage = str(v.trained)  # the node, its MLflow child run and its models/ folder
    parsed = parse_overrides(overrides)
    if v.baseline and v.name != "cpt_moe":  # a baseline's training is a node once it is asked
        asked = load_config(config, overrides=parsed).baselines.variants
        parsed = {**parsed, "baselines.variants": list(dict.fromkeys([*asked, v.name]))}
    run_dir, manifest, built = run_stage(config, parsed, stage, f"models/{stage}")
    where = run_dir.stage(f"models/{stage}").uri
    info = manifest.extra.get("train", {})
    state = "built" if built else "already complete, skipped"
    click.echo(f"{where}: {state} ({info.get('steps')} steps, {info.get('tokens')} tokens)")
    for key, value in sorted(info.get("metrics", {}).items()):
        click.echo(f"  {key}: {value:.4f}")


@cli.command("reproduce")
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--seeds", default="0,1,2", show_default=True,
              help="Comma-separated seeds; each is a replicate of the whole pipeline.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the results page here (markdown).")
@click.option("--gates", "gates_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The comparison plan (gates, headline, paired metrics) fixed "
              "before the run; default: CONFIG's sibling <stem>.gates.yaml.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path).")
def reproduce(config: Path | None, seeds: str, out_file: Path | None, gates_file: Path | None,
              overrides: tuple[str, ...]) -> None:
    """The paper's comparison at toy scale: gates, every variant over several seeds, and the
    paired differences DeltaMoE − each baseline with their intervals.

    CONFIG defaults to the committed reproduce config (fixed before any result was seen).
    """
    import shlex

    from components.evaluate.gates import load_plan
    from workflows.reproduce import run_reproduce

    config = config or REPRODUCE_CONFIG
    seed_list = int_list("--seeds", seeds)
    if not seed_list:
        raise UserError("--seeds: give at least one seed")
    if out_file is not None and out_file.resolve() == Path(config).resolve():
        raise UserError(f"--out {out_file}: is the config it reads; choose another file")
    cfg = load_config(config, overrides=parse_overrides(overrides))
    if gates_file is None:
        sibling = Path(config).with_suffix(".gates.yaml")
        gates_file = sibling if sibling.is_file() else None
    elif not gates_file.is_file():
        raise UserError(f"--gates {gates_file}: no such file")
    plan = load_plan(gates_file) if gates_file is not None else None
    if plan is None:
        click.echo(f"no comparison plan beside {config} (<stem>.gates.yaml): the page will "
                   "have no gates and no paired differences", err=True)
    shown = Path(config)
    try:
        shown = shown.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    command = shlex.join(["deltamoe", "reproduce", str(shown), "--seeds", seeds,
                          *(a for o in overrides for a in ("--set", o)),
                          *(["--out", str(out_file)] if out_file else [])])
    with workflow_errors():
        result = run_reproduce(cfg, seed_list, command=command, out=out_file, plan=plan,
                               plan_text=gates_file.read_text(encoding="utf-8")
                               if gates_file is not None else "")
    click.echo(result.table)
    click.echo(f"results: {result.run_dir}/reproduce" + (f" and {out_file}" if out_file else ""))
