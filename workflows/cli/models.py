"""Model-building commands: ``upcycle`` and ``graft``, each from a run config or from flags.

Both modes go through the same stage functions as the workflow (``build_upcycled``,
``build_grafted``), so a folder built by flags follows the same skip-or-build contract.
"""

from __future__ import annotations

from pathlib import Path

import click

from components.config import GraftConfig, UpcycleConfig, load_config
from workflows.cli.app import (
    RegistryChoice,
    UserError,
    cli,
    config_choices,
    int_list,
    parse_overrides,
    run_stage,
)


def sparsify_choices() -> tuple[str, ...]:
    """``auto`` (the method's own) or any sparsifier of the methods' registry."""
    from components.delta.methods import SPARSIFIERS

    return ("auto", *SPARSIFIERS)


def _allocation(pairs: tuple[str, ...]) -> dict[str, list[int]]:
    out = {}
    for pair in pairs:
        name, _, ids = pair.partition("=")
        if not name or not ids:
            raise UserError(f"--allocate {pair!r}: expected LANGUAGE=ID[,ID...], e.g. swh_Latn=1,2")
        out[name] = list(int_list("--allocate", ids) or ())
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
@click.option("--router-init", type=config_choices(UpcycleConfig, "router_init"),
              default="xavier_normal", show_default=True)
@click.option("--expert-noise-std", default=0.0, show_default=True,
              help="Gaussian noise on non-anchor experts (0 keeps them exact copies).")
@click.option("--layout", type=config_choices(UpcycleConfig, "layout"), default="per_expert",
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

    With CONFIG: the run's base model into runs/<run>/models/moe_init, with the config's
    allocation (language map, or LayerMoE counts measured on held-out text), logged to MLflow.
    Without: --model and --out with the flags below. Llama/Mistral → Mixtral, Qwen2 → Qwen2-MoE,
    Qwen3 → Qwen3-MoE, or the package's own class where a plan needs it; the output loads with
    AutoModelForCausalLM and computes exactly what the dense model computes until trained.
    """
    from dataclasses import asdict

    from components.moe.families import UnsupportedArchitectureError
    from components.moe.upcycle import UpcycleError, UpcycleOptions
    from components.storage import StageDir, fingerprint
    from workflows.upcycle_stage import build_upcycled

    if config is not None:
        if model_dir or out_dir:
            raise UserError("give either CONFIG or --model/--out, not both")
        _upcycle_from_config(config, overrides)
        return
    if model_dir is None or out_dir is None:
        raise UserError("--model and --out are required without a CONFIG")
    options = UpcycleOptions(
        num_experts=num_experts, top_k=top_k, layers=int_list("--layers", layers),
        experts_per_layer=int_list("--experts-per-layer", experts_per_layer),
        classifier_layers=int_list("--classifier-layers", classifier_layers) or (),
        allocation=_allocation(allocate), router_init=router_init,
        expert_noise_std=expert_noise_std, layout=layout, seq_len=seq_len, seed=seed)
    stage = StageDir(str(out_dir.resolve()))
    fp = fingerprint("upcycle", str(model_dir.resolve()), asdict(options))
    try:
        manifest, result, _ = build_upcycled(stage, fp, model_dir.resolve(), options,
                                             refuse_foreign=True)
    except (UpcycleError, UnsupportedArchitectureError) as err:
        raise UserError(str(err)) from None
    if result is None:
        click.echo(f"{out_dir}: already complete, skipped")
        return
    _print_upcycled(str(out_dir), manifest.extra["upcycle"])


def _upcycle_from_config(config: Path, overrides: tuple[str, ...]) -> None:
    from workflows.upcycle_stage import STAGE

    run_dir, manifest, built = run_stage(config, overrides, "moe_init", STAGE)
    where = run_dir.stage(STAGE).uri
    if not built:
        click.echo(f"{where}: already complete, skipped")
    _print_upcycled(where, manifest.extra["upcycle"])


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
@click.option("--method", type=RegistryChoice("components.delta.methods:METHODS"), default=None,
              help="Default: deltamoe (or the config's graft.method).")
@click.option("--scale", default=1.0, show_default=True, help="λ, the global scale of Δ.")
@click.option("--expert-scale", "expert_scales", multiple=True, metavar="E=S",
              help="α_e for expert E (repeatable).")
@click.option("--family-scale", "family_scales", multiple=True, metavar="FAMILY=S",
              help="Scale for attention, mlp, norm, embed or lm_head (repeatable).")
@click.option("--sparsify", type=RegistryChoice("workflows.cli.models:sparsify_choices"),
              default="auto",
              show_default=True)
@click.option("--density", default=1.0, show_default=True, help="TIES/DARE share of Δ kept.")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=config_choices(GraftConfig, "dtype"),
              default="auto", show_default=True)
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--workers", default=1, show_default=True,
              help="Ray tasks in parallel (1: in this process).")
@click.option("--verify", "check", is_flag=True,
              help="Compare a sample of output tensors with each method's independent "
                   "reference computation (components/delta/verify.py).")
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
    from components.storage import StageDir, fingerprint
    from workflows.graft_stage import build_grafted

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
        _, result = build_grafted(stage, fp, inputs, options, verify_output=check,
                                  refuse_foreign=True)
    except GraftError as err:
        raise UserError(str(err)) from None
    if result is None:
        click.echo(f"{out_dir}: already complete, skipped")
        return
    click.echo(f"{result.method} written to {out_dir}: {result.tensors} tensors, "
               f"{result.bytes / 1e6:.1f} MB in {result.units} layer tasks\n{result.formula}"
               + ("\nverified: sample matches the independent reference" if check else ""))


def _graft_from_config(config: Path, method: str | None, overrides: tuple[str, ...]) -> None:
    parsed = parse_overrides(overrides)
    name = method or load_config(config, overrides=parsed).graft.method
    # the method's variant is a node of this run's DAG once it is the run's graft method
    run_dir, manifest, built = run_stage(config, {**parsed, "graft.method": name}, name,
                                         f"models/{name}")
    where = run_dir.stage(f"models/{name}").uri
    state = "written" if built else "already complete, skipped"
    click.echo(f"{name} {state}: {where} ({manifest.extra['graft']['tensors']} tensors)")
