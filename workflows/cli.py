"""The ``deltamoe`` command line.

Every stage of the workflow has a subcommand; the ones whose stage is not built yet say so and
exit non-zero instead of pretending. Errors a user can fix (a bad config, a missing path) are
printed as one clear message with exit status 2, never as a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from components.config import ConfigError, dump_config, load_config

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


class UserError(click.ClickException):
    """Something the user can fix; exit status 2 like every other input error."""

    exit_code = 2

def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)])
    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "urllib3", "filelock",
                  "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="deltamoe")
def cli(verbose: bool) -> None:
    """DeltaMoE: add languages to an instruct LLM without alignment data.

    Upcycle the dense base into a language-allocated MoE, continue pre-training on the new
    languages, then graft the post-training delta (θ_instruct − θ_base) onto it.
    """
    _setup_logging(verbose)


# ----------------------------------------------------------------------------- config


@cli.group()
def config() -> None:
    """Validate or show a run config (YAML with ${ENV} interpolation)."""


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_validate(file: Path) -> None:
    """Check FILE; on error print each bad key's path (and line) and exit 2."""
    cfg = load_config(file)
    click.echo(f"{file}: valid (run '{cfg.run_name}', original "
               f"{', '.join(cfg.languages.original)}; new {', '.join(cfg.languages.new)})")


@config.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_show(file: Path) -> None:
    """Print FILE resolved: environment substituted, defaults filled in, secrets masked."""
    click.echo(dump_config(load_config(file)), nl=False)


# ----------------------------------------------------------------------------- demo


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

    result = run_demo(config_file)
    click.echo(result.summary())


@demo.command("world")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (built atomically; skipped if already complete).")
@click.option("--seed", default=0, show_default=True, help="World seed: same seed, same bytes.")
@click.option("--arch", type=click.Choice(["llama", "qwen2"]), default="llama",
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


# ----------------------------------------------------------------------------- upcycle


def _parse_overrides(pairs: tuple[str, ...]) -> dict[str, object]:
    """``--set train.steps=10`` pairs; values are read as YAML (numbers, lists, booleans)."""
    import yaml

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE with a dotted key")
        out[key] = yaml.safe_load(value)
    return out


def _int_list(option: str, text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{option}: expected comma-separated integers, got {text!r}") from None


def _allocation(pairs: tuple[str, ...]) -> dict[str, list[int]]:
    out = {}
    for pair in pairs:
        name, _, ids = pair.partition("=")
        if not name or not ids:
            raise UserError(f"--allocate {pair!r}: expected LANGUAGE=ID[,ID...], e.g. swh_Latn=1,2")
        out[name] = list(_int_list("--allocate", ids) or ())
    return out


def _print_upcycled(out: str, summary: dict) -> None:
    counts = sorted({n for n in summary["experts_per_layer"] if n})
    moe_layers = sum(1 for n in summary["experts_per_layer"] if n)
    click.echo(
        f"{summary['model_type']} written to {out}: {moe_layers} MoE layers × {counts} experts, "
        f"{summary['layout']} layout\n"
        f"parameters: dense {summary['dense_parameters']:,}, MoE total "
        f"{summary['moe_parameters']:,}, active per token {summary['active_parameters']:,}\n"
        f"forward FLOPs per token (n_ctx={summary['seq_len']}): dense "
        f"{summary['dense_flops_per_token']:,}, MoE active {summary['active_flops_per_token']:,} "
        f"(ratio {summary['active_ratio']:.3f})")


@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path),
              help="Dense Hugging Face model directory (safetensors), without a CONFIG.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="MoE directory to write (built atomically; skipped if already complete).")
@click.option("--num-experts", default=4, show_default=True, help="Experts per MoE layer.")
@click.option("--top-k", default=2, show_default=True, help="Experts per token.")
@click.option("--layers", default=None, help="Comma-separated layer ids to upcycle (default: all;"
              " the others stay dense).")
@click.option("--experts-per-layer", default=None,
              help="LayerMoE plan: comma-separated expert count per layer (0 = dense).")
@click.option("--classifier-layers", default=None,
              help="Comma-separated MoE layers that get a language-group classifier.")
@click.option("--allocate", "allocate", multiple=True,
              help="LANGUAGE=ID[,ID...]: experts allowed to a language (repeatable).")
@click.option("--router-init", type=click.Choice(["xavier_normal", "zeros", "normal"]),
              default="xavier_normal", show_default=True)
@click.option("--expert-noise-std", default=0.0, show_default=True,
              help="Gaussian noise on non-anchor experts (0 keeps them exact copies).")
@click.option("--layout", type=click.Choice(["per_expert", "fused"]), default="per_expert",
              show_default=True, help="Expert tensor layout written.")
@click.option("--seq-len", default=2048, show_default=True,
              help="Context length for the FLOPs accounting.")
@click.option("--seed", default=0, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="With CONFIG: override a config key (dotted path).")
def upcycle(config: Path | None, model_dir: Path | None, out_dir: Path | None, num_experts: int,
            top_k: int, layers: str | None, experts_per_layer: str | None,
            classifier_layers: str | None, allocate: tuple[str, ...], router_init: str,
            expert_noise_std: float, layout: str, seq_len: int, seed: int,
            overrides: tuple[str, ...]) -> None:
    """Turn a dense model into a Mixture-of-Experts whose experts copy the dense FFN.

    With CONFIG: the run's base model into runs/<run>/models/moe-init, with the config's
    allocation (language map, or LayerMoE counts measured on held-out text), logged to MLflow.
    Without: --model and --out with the flags below. Llama/Mistral → Mixtral, Qwen2 → Qwen2-MoE,
    Qwen3 → Qwen3-MoE, or the package's own class where a plan needs it; the output loads with
    AutoModelForCausalLM and computes exactly what the dense model computes until trained.
    """
    from dataclasses import asdict

    from components.moe.families import UnsupportedArchitectureError
    from components.moe.upcycle import UpcycleError, UpcycleOptions
    from components.moe.upcycle import upcycle as run_upcycle
    from components.storage import StageDir, fingerprint

    if config is not None:
        if model_dir or out_dir:
            raise UserError("give either CONFIG or --model/--out, not both")
        _upcycle_from_config(config, overrides)
        return
    if model_dir is None or out_dir is None:
        raise UserError("--model and --out are required without a CONFIG")
    options = UpcycleOptions(
        num_experts=num_experts, top_k=top_k, layers=_int_list("--layers", layers),
        experts_per_layer=_int_list("--experts-per-layer", experts_per_layer),
        classifier_layers=_int_list("--classifier-layers", classifier_layers) or (),
        allocation=_allocation(allocate), router_init=router_init,
        expert_noise_std=expert_noise_std, layout=layout, seq_len=seq_len, seed=seed)
    stage = StageDir(str(out_dir.resolve()))
    fp = fingerprint("upcycle", str(model_dir.resolve()), asdict(options))
    if stage.is_complete(fp):
        click.echo(f"{out_dir}: already complete, skipped")
        return
    try:
        with stage.build(fp, inputs={"model": str(model_dir.resolve())},
                         config=asdict(options), refuse_foreign=True) as work:
            result = run_upcycle(model_dir, work.path, options)
            work.extra["upcycle"] = result.summary()
    except (UpcycleError, UnsupportedArchitectureError) as err:
        raise UserError(str(err)) from None
    _print_upcycled(str(out_dir), result.summary())


def _tracked(config: Path, overrides: tuple[str, ...], stage: str, errors: tuple[type, ...],
             build: Any) -> tuple[Any, Any, bool]:
    """Load CONFIG, open the run's MLflow parent, run ``build(cfg, run_dir, logger)`` in the
    stage's child run; ``errors`` become one message and exit 2. Returns (run_dir, manifest,
    built)."""
    from components.storage import RunDir, fingerprint
    from components.tracking import ExpansionTracker, resolve_tracking_uri

    cfg = load_config(config, overrides=_parse_overrides(overrides))
    run_dir = RunDir(cfg.storage.root, cfg.run_name, cfg.storage.storage_options)
    tracker = ExpansionTracker(resolve_tracking_uri(cfg.tracking.uri, run_dir),
                               cfg.tracking.experiment, cfg.run_name, tags=cfg.tracking.tags)
    resolved = cfg.model_dump(mode="json")
    tracker.log_config(resolved, fingerprint(resolved))
    try:
        with tracker.stage(stage) as logger:
            manifest, built = build(cfg, run_dir, logger)
    except errors as err:
        tracker.finish(failed=True)
        raise UserError(str(err)) from None
    except BaseException:
        tracker.finish(failed=True)
        raise
    tracker.finish()
    return run_dir, manifest, built


def _upcycle_from_config(config: Path, overrides: tuple[str, ...]) -> None:
    from components.moe.families import UnsupportedArchitectureError
    from components.moe.upcycle import UpcycleError
    from workflows.upcycle_stage import STAGE, ensure_upcycled

    run_dir, manifest, built = _tracked(config, overrides, "upcycle",
                                        (UpcycleError, UnsupportedArchitectureError),
                                        ensure_upcycled)
    where = run_dir.stage(STAGE).uri
    if not built:
        click.echo(f"{where}: already complete, skipped")
    _print_upcycled(where, manifest.extra["upcycle"])


# ----------------------------------------------------------------------------- graft


def _scales(option: str, pairs: tuple[str, ...], key_type: type) -> dict:
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            out[key_type(name)] = float(value)
        except ValueError:
            raise UserError(f"{option} {pair!r}: expected NAME=NUMBER") from None
    return out


@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(exists=True, file_okay=False), help="θ_base directory.")
@click.option("--post", type=click.Path(exists=True, file_okay=False),
              help="θ_post (instruct) directory.")
@click.option("--target", type=click.Path(exists=True, file_okay=False),
              help="The model that receives Δ: CPT-MoE (deltamoe) or CPT-dense (baselines).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (built atomically; skipped if already complete).")
@click.option("--method", type=click.Choice(["deltamoe", "param_delta", "task_arithmetic",
                                             "ties", "dare"]), default=None,
              help="Default: deltamoe (or the config's graft.method).")
@click.option("--scale", default=1.0, show_default=True, help="λ, the global scale of Δ.")
@click.option("--expert-scale", "expert_scales", multiple=True, metavar="E=S",
              help="α_e for expert E (repeatable).")
@click.option("--family-scale", "family_scales", multiple=True, metavar="FAMILY=S",
              help="Scale for attention, mlp, norm, embed or lm_head (repeatable).")
@click.option("--sparsify", type=click.Choice(["auto", "none", "ties", "dare"]), default="auto",
              show_default=True)
@click.option("--density", default=1.0, show_default=True, help="TIES/DARE share of Δ kept.")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True)
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--workers", default=1, show_default=True,
              help="Ray tasks in parallel (1: in this process).")
@click.option("--verify", "check", is_flag=True,
              help="Reload a sample of output tensors and compare with a direct computation.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="With CONFIG: override a config key (dotted path).")
def graft(config: Path | None, base: str | None, post: str | None, target: str | None,
          out_dir: Path | None, method: str | None, scale: float,
          expert_scales: tuple[str, ...], family_scales: tuple[str, ...], sparsify: str,
          density: float, seed: int, dtype: str, max_shard_size: str, workers: int, check: bool,
          overrides: tuple[str, ...]) -> None:
    """Graft Δpost = θ_post − θ_base onto a trained model, or build a merge baseline.

    With CONFIG: the run's models (graft.method, or --method) into runs/<run>/models/<method>.
    Without: --base, --post, --target and --out. Streams tensor by tensor in per-layer tasks.
    """
    from dataclasses import asdict

    from components.delta.graft import GraftError, GraftInputs, GraftOptions, parse_size
    from components.delta.graft import graft as run_graft
    from components.delta.graft import verify as run_verify
    from components.storage import StageDir, fingerprint

    if config is not None:
        if base or post or target or out_dir:
            raise UserError("give either CONFIG or --base/--post/--target/--out, not both")
        _graft_from_config(config, method, overrides)
        return
    missing = [n for n, v in (("--base", base), ("--post", post), ("--target", target),
                              ("--out", out_dir)) if not v]
    if missing:
        raise UserError(f"{', '.join(missing)} required without a CONFIG")
    assert base and post and target and out_dir
    try:
        options = GraftOptions(
            method=method or "deltamoe", scale=scale,
            expert_scales=_scales("--expert-scale", expert_scales, int),
            family_scales=_scales("--family-scale", family_scales, str), sparsify=sparsify,
            density=density, seed=seed, dtype=dtype, max_shard_bytes=parse_size(max_shard_size),
            workers=workers)
        inputs = GraftInputs(*(str(Path(p).resolve()) for p in (base, post, target)))
        stage = StageDir(str(out_dir.resolve()))
        fp = fingerprint("graft", asdict(inputs), {**asdict(options), "workers": None})
        if stage.is_complete(fp):
            click.echo(f"{out_dir}: already complete, skipped")
            return
        with stage.build(fp, inputs=asdict(inputs), config=asdict(options),
                         refuse_foreign=True) as work:
            result = run_graft(inputs, work.path, options)
            if check:
                work.extra["verified"] = run_verify(inputs, work.path, options)
            work.extra["graft"] = asdict(result)
    except GraftError as err:
        raise UserError(str(err)) from None
    click.echo(f"{result.method} written to {out_dir}: {result.tensors} tensors, "
               f"{result.bytes / 1e6:.1f} MB in {result.units} layer tasks\n{result.formula}"
               + ("\nverified: sample matches the direct computation" if check else ""))


def _graft_from_config(config: Path, method: str | None, overrides: tuple[str, ...]) -> None:
    from components.delta.graft import GraftError
    from workflows.graft_stage import ensure_grafted

    name = method or load_config(config, overrides=_parse_overrides(overrides)).graft.method
    run_dir, manifest, built = _tracked(
        config, overrides, f"graft-{name}", (GraftError,),
        lambda cfg, run_dir, logger: ensure_grafted(cfg, run_dir, name, logger))
    where = run_dir.stage(f"models/{name}").uri
    state = "written" if built else "already complete, skipped"
    click.echo(f"{name} {state}: {where} ({manifest.extra['graft']['tensors']} tensors)")


# ----------------------------------------------------------------------------- run


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors of the stages that mean bad input rather than a bug: one message, exit 2."""
    from components.delta.graft import GraftError
    from components.moe.families import UnsupportedArchitectureError
    from components.moe.upcycle import UpcycleError

    return (UpcycleError, UnsupportedArchitectureError, GraftError)


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
    """Run the whole expansion of CONFIG, resuming at the first stage that is not complete.

    Stages: world, base-data, base, post (a synthetic-world run makes its own model pair), data,
    upcycle, cpt-moe, graft, baselines, evaluate, report. Each is skipped when its manifest
    matches; MLflow holds one parent run with a child per stage.
    """
    from workflows.expand import run_workflow, select_stages

    if from_stage and only:
        raise UserError("give --from or --only, not both")
    cfg = load_config(config, overrides=_parse_overrides(overrides))
    try:
        select_stages(cfg, from_stage, only)
    except ValueError as err:
        raise UserError(str(err)) from None
    try:
        result = run_workflow(cfg, from_stage=from_stage, only=only)
    except _user_errors() as err:
        raise UserError(str(err)) from None
    click.echo(result.summary())


# ----------------------------------------------------------------------------- evaluate


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
    from components.evaluate.suites import SuiteError
    from components.storage import RunDir, fingerprint
    from components.tracking import ExpansionTracker, resolve_tracking_uri
    from workflows.evaluate_stage import comparison_table, ensure_evaluated

    extra: dict[str, object] = {}
    if data_dir:
        extra["evaluation.data_dir"] = str(Path(data_dir).resolve())
    if variants:
        extra["evaluation.variants"] = list(variants)
    if limit:
        extra["evaluation.limit"] = limit
    cfg = load_config(config, overrides={**_parse_overrides(overrides), **extra})
    run_dir = RunDir(cfg.storage.root, cfg.run_name, cfg.storage.storage_options)
    tracker = ExpansionTracker(resolve_tracking_uri(cfg.tracking.uri, run_dir),
                               cfg.tracking.experiment, cfg.run_name, tags=cfg.tracking.tags)
    resolved = cfg.model_dump(mode="json")
    tracker.log_config(resolved, fingerprint(resolved))
    try:
        evaluated = ensure_evaluated(cfg, run_dir, tracker=tracker)
    except SuiteError as err:
        tracker.finish(failed=True)
        raise UserError(str(err)) from None
    except BaseException:
        tracker.finish(failed=True)
        raise
    tracker.finish()
    click.echo(comparison_table(cfg, evaluated))
    click.echo(f"results: {run_dir.stage('eval').uri}")


# ----------------------------------------------------------------------------- data


@cli.command("data")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path).")
def data_command(config: Path, overrides: tuple[str, ...]) -> None:
    """Read, language-tag, filter, dedup, tokenize, mix and pack the corpora into ``data/``."""
    from components.data import DataError
    from workflows.data_stage import STAGE, ensure_data

    def build(cfg: Any, run_dir: Any, logger: Any) -> tuple[Any, bool]:
        from components.data.tokenize import load_tokenizer
        from workflows.data_stage import tokenizer_dir
        from workflows.expand import init_ray

        load_tokenizer(tokenizer_dir(cfg, run_dir))  # named before Ray starts
        owns_ray = init_ray(cfg)
        try:
            return ensure_data(cfg, run_dir, logger)
        finally:
            if owns_ray:
                import ray

                ray.shutdown()

    run_dir, manifest, built = _tracked(config, overrides, "data",
                                        (DataError, FileNotFoundError), build)
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


# ----------------------------------------------------------------------------- train


@cli.command("train")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--variant", type=str, default="cpt-moe", show_default=True,
              help="cpt-moe, cpt-moe-<name>, cpt-dense or flops-matched.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path).")
def train_command(config: Path, variant: str, overrides: tuple[str, ...]) -> None:
    """Continued pre-training on Ray Train (FSDP2); resumes from the last checkpoint."""
    from components.train.spec import TrainError
    from workflows.train_stage import ensure_trained

    stage = variant if variant.startswith("cpt-") else f"cpt-{variant}"  # the MLflow child run
    run_dir, manifest, built = _tracked(
        config, overrides, stage, (TrainError, FileNotFoundError, ValueError),
        lambda cfg, rd, lg: ensure_trained(cfg, rd, variant, lg))
    where = run_dir.stage(f"models/{variant}").uri
    info = manifest.extra.get("train", {})
    state = "built" if built else "already complete, skipped"
    click.echo(f"{where}: {state} ({info.get('steps')} steps, {info.get('tokens')} tokens)")
    for key, value in sorted(info.get("metrics", {}).items()):
        click.echo(f"  {key}: {value:.4f}")


# ----------------------------------------------------------------------------- reproduce

REPRODUCE_CONFIG = Path(__file__).parent / "configs" / "reproduce.yaml"


@cli.command("reproduce")
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--seeds", default="0,1,2", show_default=True,
              help="Comma-separated seeds; each is a replicate of the whole pipeline.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the results page here (markdown).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path).")
def reproduce(config: Path | None, seeds: str, out_file: Path | None,
              overrides: tuple[str, ...]) -> None:
    """The paper's comparison at toy scale: every variant over several seeds, mean ± std.

    CONFIG defaults to the committed reproduce config (fixed before any result was seen).
    """
    import shlex

    from workflows.reproduce import run_reproduce

    config = config or REPRODUCE_CONFIG
    seed_list = _int_list("--seeds", seeds)
    if not seed_list:
        raise UserError("--seeds: give at least one seed")
    cfg = load_config(config, overrides=_parse_overrides(overrides))
    shown = Path(config)
    try:
        shown = shown.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    command = shlex.join(["deltamoe", "reproduce", str(shown), "--seeds", seeds,
                          *(a for o in overrides for a in ("--set", o)),
                          *(["--out", str(out_file)] if out_file else [])])
    try:
        result = run_reproduce(cfg, seed_list, command=command, out=out_file)
    except _user_errors() as err:
        raise UserError(str(err)) from None
    click.echo(result.table)
    click.echo(f"results: {result.run_dir}/reproduce" + (f" and {out_file}" if out_file else ""))


# ----------------------------------------------------------------------------- cluster jobs


def _address_option(func: Any) -> Any:
    return click.option("--address", envvar="RAY_ADDRESS", required=True, metavar="ADDR",
                        help="Ray job server, e.g. http://127.0.0.1:8265 (or RAY_ADDRESS).")(func)


def _slot(text: str | None) -> Any:
    from datetime import datetime

    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--slot {text!r}: expected an ISO date-time, e.g. 2026-01-31T02:00Z"
                        ) from None


def _client(address: str) -> Any:
    from workflows.submit import SubmitError, connect

    try:
        return connect(address)
    except SubmitError as err:
        raise UserError(str(err)) from None


def _finish_wait(client: Any, sid: str) -> None:
    from workflows.submit import wait_for_job

    status = wait_for_job(client, sid, write=lambda text: click.echo(text, nl=False))
    click.echo(f"job {sid}: {status}")
    if status != "SUCCEEDED":
        sys.exit(1)


@cli.command("submit")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@_address_option
@click.option("--wait", is_flag=True, help="Stream the job's logs; exit 1 unless it succeeds.")
@click.option("--slot", default=None, metavar="ISO",
              help="Schedule slot (a cron tick): part of the submission id.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path); passed on to `deltamoe run`.")
@click.option("--from", "from_stage", default=None, metavar="STAGE",
              help="Passed on to `deltamoe run`.")
@click.option("--only", "only", multiple=True, metavar="STAGE",
              help="Passed on to `deltamoe run` (repeatable).")
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Folder shipped as the job's working dir (default: the "
              "project checkout).")
@click.option("--no-pip", is_flag=True,
              help="Drop the runtime env's pip section (the image holds the dependencies).")
@click.option("--env", "extra_env", multiple=True, metavar="NAME",
              help="Also pass this environment variable to the job when set (repeatable).")
def submit_command(config: Path, address: str, wait: bool, slot: str | None,
                   overrides: tuple[str, ...], from_stage: str | None, only: tuple[str, ...],
                   working_dir: Path | None, no_pip: bool, extra_env: tuple[str, ...]) -> None:
    """Submit `deltamoe run CONFIG` to a Ray cluster as a job.

    The submission id comes from the resolved config (and --slot, --from/--only), so submitting
    the same thing again reports the existing job instead of starting another.
    """
    from workflows.expand import select_stages
    from workflows.submit import PROJECT_ROOT, SubmitError, submit

    if from_stage and only:
        raise UserError("give --from or --only, not both")
    parsed = _parse_overrides(overrides)
    cfg = load_config(config, overrides=parsed)
    try:
        select_stages(cfg, from_stage, only)
    except ValueError as err:
        raise UserError(str(err)) from None
    run_args = [*(["--from", from_stage] if from_stage else []),
                *(a for stage in only for a in ("--only", stage))]
    client = _client(address)
    try:
        sub = submit(config, client, slot=_slot(slot), overrides=parsed, run_args=run_args,
                     working_dir=working_dir or PROJECT_ROOT, pip=not no_pip,
                     extra_env=extra_env)
    except SubmitError as err:
        raise UserError(str(err)) from None
    if sub.created:
        click.echo(f"submitted {sub.submission_id}: {sub.entrypoint}")
        click.echo(f"env passed: {', '.join(sorted(sub.runtime_env['env_vars'])) or 'none'}")
    else:
        click.echo(f"already submitted {sub.submission_id} ({sub.status}): nothing new started")
    if wait:
        _finish_wait(client, sub.submission_id)
    else:
        click.echo(f"follow: deltamoe logs {sub.submission_id} --address {address}")


@contextmanager
def _submit_errors() -> Iterator[None]:
    """A job-server failure as the CLI's one-line user error."""
    from workflows.submit import SubmitError

    try:
        yield
    except SubmitError as err:
        raise UserError(str(err)) from None


@cli.command("status")
@click.argument("submission_id")
@_address_option
def status_command(submission_id: str, address: str) -> None:
    """Status of a submitted job."""
    from workflows.submit import job_status

    with _submit_errors():
        info = job_status(_client(address), submission_id)
    status = getattr(info.status, "value", info.status)
    click.echo(f"{submission_id}: {status}" + (f" ({info.message})" if info.message else ""))
    click.echo(f"entrypoint: {info.entrypoint}")


@cli.command("logs")
@click.argument("submission_id")
@_address_option
@click.option("--follow", "-f", is_flag=True, help="Stream until the job ends.")
def logs_command(submission_id: str, address: str, follow: bool) -> None:
    """Logs of a submitted job."""
    from workflows.submit import job_logs

    client = _client(address)
    with _submit_errors():
        if follow:
            _finish_wait(client, submission_id)
        else:
            click.echo(job_logs(client, submission_id), nl=False)


@cli.command("stop")
@click.argument("submission_id")
@_address_option
def stop_command(submission_id: str, address: str) -> None:
    """Stop a submitted job."""
    from workflows.submit import stop_job

    with _submit_errors():
        stopped = stop_job(_client(address), submission_id)
    click.echo(f"{submission_id}: " + ("stop requested" if stopped else "already ended"))


@cli.group("schedule")
def schedule_group() -> None:
    """Recurring expansions from a schedule file (cron expressions → configs or sweeps)."""


@schedule_group.command("run-due")
@click.argument("schedule", type=click.Path(dir_okay=False, path_type=Path))
@_address_option
@click.option("--now", "now_text", default=None, metavar="ISO",
              help="Evaluate the schedule at this time instead of the clock (UTC if naive).")
@click.option("--dry-run", is_flag=True, help="Print what is due; submit nothing.")
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Folder shipped as the jobs' working dir.")
@click.option("--no-pip", is_flag=True,
              help="Drop the runtime env's pip section (the image holds the dependencies).")
@click.option("--env", "extra_env", multiple=True, metavar="NAME",
              help="Also pass this environment variable to the jobs when set (repeatable).")
def schedule_run_due(schedule: Path, address: str, now_text: str | None, dry_run: bool,
                     working_dir: Path | None, no_pip: bool, extra_env: tuple[str, ...]) -> None:
    """Submit what SCHEDULE has due now, skipping what was already submitted for its slot.

    Idempotent: safe to call from cron, Airflow or a KubeRay RayCronJob at any frequency.
    """
    from datetime import UTC, datetime

    from workflows.schedule import due_jobs, load_schedule, run_due
    from workflows.submit import PROJECT_ROOT, SubmitError

    now = _slot(now_text) if now_text else datetime.now(UTC)
    due = due_jobs(load_schedule(schedule), schedule.resolve().parent, now)  # validate first
    if dry_run:
        for job in due:
            state = "missed (older than max_delay_minutes)" if job.missed else "due"
            click.echo(f"{job.entry}: {job.run_name} slot {job.slot.isoformat()} {state}")
        return
    try:
        results = run_due(schedule, _client(address), now,
                          working_dir=working_dir or PROJECT_ROOT, pip=not no_pip,
                          extra_env=extra_env)
    except SubmitError as err:
        raise UserError(str(err)) from None
    for job, sub in results:
        if sub is None:
            state = "missed (older than max_delay_minutes): not submitted"
        elif sub.created:
            state = f"submitted {sub.submission_id}"
        else:
            state = f"already submitted {sub.submission_id} ({sub.status})"
        click.echo(f"{job.entry}: {job.run_name} slot {job.slot.isoformat()}: {state}")


# ----------------------------------------------------------------------------- report


@cli.command("report")
@click.argument("run_name")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Run config (storage root, tracking URI, languages); RUN_NAME "
              "replaces its run_name, so one config reports every run of a sweep.")
@click.option("--root", default="runs", show_default=True,
              help="Storage root holding RUN_NAME/, without --config.")
def report_command(run_name: str, config_file: Path | None, root: str) -> None:
    """Build the HTML report of RUN_NAME from MLflow into runs/RUN_NAME/report/index.html and
    log it as an artifact of the run's `report` child run."""
    from components.storage import RunDir
    from components.tracking import resolve_tracking_uri
    from dashboards.report import ReportError, report_child_logger, report_run

    if config_file is not None:
        cfg = load_config(config_file, overrides={"run_name": run_name})
        root, options, experiment = (cfg.storage.root, cfg.storage.storage_options,
                                     cfg.tracking.experiment)
        configured, languages = cfg.tracking.uri, (cfg.languages.original, cfg.languages.new)
    else:
        options, experiment, configured, languages = {}, None, None, (None, None)
        if "://" not in root and not (Path(root) / run_name).is_dir():
            raise UserError(f"{Path(root) / run_name}: no such run directory (pass --root or "
                            "--config)")
    run_dir = RunDir(root, run_name, options)
    uri = resolve_tracking_uri(configured, run_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow store at {uri} (set MLFLOW_TRACKING_URI or tracking.uri)")
    try:
        logger = report_child_logger(uri, run_name, experiment)
        path = report_run(run_name, run_dir, uri, experiment=experiment, original=languages[0],
                          new=languages[1], logger=logger)
    except ReportError as err:
        raise UserError(str(err)) from None
    click.echo(f"report: {path}")


# ----------------------------------------------------------------------------- sweep


def _language_sets(values: tuple[str, ...]) -> Any:
    """``-l swh_Latn -l east=swh_Latn,yor_Latn`` → a list of sets, or name → set when named."""
    sets = []
    for value in values:
        name, sep, tags = value.rpartition("=")
        members = [t.strip() for t in tags.split(",") if t.strip()]
        if not members or (sep and not name):
            raise UserError(f"--languages {value!r}: expected TAG[,TAG...] or NAME=TAG[,TAG...]")
        sets.append((name or None, members))
    if any(name for name, _ in sets):
        if not all(name for name, _ in sets):
            raise UserError("--languages: name every set (NAME=TAGS) or none")
        return dict(sets)
    return [members for _, members in sets]


@cli.command("sweep")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--languages", "-l", "language_sets", multiple=True, required=True,
              metavar="[NAME=]TAG[,TAG...]",
              help="One language set to add (repeatable): one expansion per set.")
@click.option("--from", "from_stage", default=None, metavar="STAGE",
              help="Start every run at STAGE.")
@click.option("--only", "only", multiple=True, metavar="STAGE", help="Run only STAGE.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path) of every run.")
def sweep_command(config: Path, language_sets: tuple[str, ...], from_stage: str | None,
                  only: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """One expansion of CONFIG per language set (runs named <run_name>-<set>, same data
    sources), one after the other, then a table comparing them. Exit 1 if any run failed."""
    from workflows.expand import select_stages
    from workflows.sweep import expand_sweep, run_sweep, sweep_summary

    if from_stage and only:
        raise UserError("give --from or --only, not both")
    cfg = load_config(config, overrides=_parse_overrides(overrides))
    sets = _language_sets(language_sets)
    try:
        for run_cfg in expand_sweep(cfg, sets):  # every run's config valid before any starts
            select_stages(run_cfg, from_stage, only)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise UserError(str(err)) from None
    runs = run_sweep(cfg, sets, from_stage=from_stage, only=only)
    for run in runs:
        if run.result is not None:
            click.echo(f"\n## {run.cfg.run_name}\n{run.result.summary()}")
    click.echo(f"\n## sweep of {cfg.run_name}: {len(runs)} runs\n{sweep_summary(runs)}")
    if any(run.error for run in runs):
        sys.exit(1)


def main() -> None:
    """Console entry point: user errors become one message and exit status 2."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except ConfigError as err:
        click.echo(f"config error:\n{err}", err=True)
        sys.exit(2)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # the machine, not the input: a full disk, a lost mount
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except SystemExit:
        raise
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
