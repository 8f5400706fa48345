"""The sections of the run schema and :class:`RunConfig`, the whole of one expansion."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from components.config.names import (
    Baseline,
    GraftMethod,
    LangTag,
    SourceFormat,
    Suite,
    VariantName,
    _lang_tag,
    _MaskedOptions,
)
from components.config.section import _Section
from components.config.world import WorldConfig


class ModelsConfig(_Section):
    """The dense model pair: ``base`` and its post-trained sibling (local path or hub id).

    There is no ``trust_remote_code``: every model is loaded with it off. Upcycling and grafting
    take only the families of :mod:`components.moe.families` (transformers' own classes), so
    turning it on could make no further model work, only run a checkpoint's Python."""

    base: str = Field(min_length=1)
    post: str = Field(min_length=1)
    revision: str | None = None
    hf_token: SecretStr | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"

    @model_validator(mode="before")
    @classmethod
    def _no_remote_code(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trust_remote_code" in data:
            raise ValueError("models.trust_remote_code is not supported: models are always "
                             "loaded without running their own code, and the families this "
                             "project upcycles and grafts need none; remove the key")
        return data


class LanguagesConfig(_Section):
    """Languages the post-trained model already speaks (``original``) and those to add."""

    original: list[LangTag] = Field(min_length=1)
    new: list[LangTag] = Field(min_length=1)

    @field_validator("original", "new")
    @classmethod
    def _unique(cls, tags: list[str]) -> list[str]:
        dupes = sorted({t for t in tags if tags.count(t) > 1})
        if dupes:
            raise ValueError(f"listed more than once: {', '.join(dupes)}")
        return tags

    @field_validator("new")
    @classmethod
    def _disjoint(cls, new: list[str], info: ValidationInfo) -> list[str]:
        both = sorted(set(new) & set(info.data.get("original", [])))
        if both:
            raise ValueError(f"also listed in languages.original: {', '.join(both)}")
        return new

    @property
    def all(self) -> list[str]:
        return [*self.original, *self.new]


class DataSource(_MaskedOptions, _Section):
    """One corpus. ``fineweb2``/``culturax`` know their directory layouts; jsonl/parquet don't."""

    name: str = Field(min_length=1)
    format: SourceFormat = Field(description="a reader of components.data.readers.READERS")
    path: str = Field(min_length=1,
                      description="local path or fsspec URI; {run_dir} expands to the run dir")
    text_column: str = "text"
    language_column: str | None = None
    languages: list[LangTag] | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)


class LIDConfig(_Section):
    """Language identification: which backend, and whether it only tags or also filters."""

    backend: Literal["glotlid", "py3langid", "source"] = "source"
    model_path: str | None = None
    mode: Literal["tag", "filter"] = "tag"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    thresholds: dict[LangTag, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _glotlid_needs_model(self) -> LIDConfig:
        if self.backend == "glotlid" and not self.model_path:
            raise ValueError("backend 'glotlid' needs model_path (a fastText .bin file)")
        return self


class FilterThresholds(_Section):
    """Document quality filters; ``None`` disables a filter."""

    min_chars: int | None = Field(20, ge=0)
    max_chars: int | None = Field(100_000, ge=1, description=(
        "longer documents are dropped (counted as max_chars) before language ID and "
        "tokenization: one 50 MB line took a worker to 7 GB; None keeps every length"))
    max_duplicate_line_fraction: float | None = Field(0.3, ge=0.0, le=1.0)
    max_non_alpha_fraction: float | None = Field(0.5, ge=0.0, le=1.0)


class FiltersConfig(FilterThresholds):
    """Defaults for all languages plus per-language overrides (scripts differ in density)."""

    per_language: dict[LangTag, FilterThresholds] = Field(default_factory=dict)


class DedupConfig(_Section):
    exact: bool = True
    minhash: bool = False
    minhash_threshold: float = Field(0.8, gt=0.0, le=1.0)
    num_perm: int = Field(128, ge=16)
    scope: Literal["language", "global"] = Field("language", description=(
        "language: a document is a duplicate only of one in its own language; global: of any "
        "(the copy with the smaller (source, file, row) key is kept)"))


class MixConfig(_Section):
    """How many tokens of each language go into training.

    ``ratios`` are shares of the new-language tokens; ``replay_ratio`` is the share of the total
    given to the original languages (split evenly unless ``ratios`` names them too).
    """

    ratios: dict[LangTag, Annotated[float, Field(gt=0.0)]] = Field(default_factory=dict)
    replay_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    token_budget: int | None = Field(None, ge=1)
    tokens_per_language: dict[LangTag, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict
    )
    mode: Literal["ratio", "all"] = Field("ratio", description=(
        "ratio: the shares above (capped by the scarcest language); all: every kept token "
        "trains, and the shares that gives are reported"))


class DataConfig(_Section):
    sources: list[DataSource] = Field(default_factory=list)
    seq_len: int = Field(512, ge=8)
    validation_fraction: float = Field(0.02, ge=0.0, lt=0.5)
    tokenizer: str | None = Field(None, description="defaults to the base model's tokenizer")
    batch_size: int = Field(256, ge=1)
    actors: int | None = Field(
        None, ge=1, description="document operator actors (language ID, filters, hashes, "
        "tokenizer); default one per cluster CPU, each encoding on one thread, but no more than "
        "the input's 8 MiB blocks. Lower it when the LID model is large (each actor loads it). "
        "Does not change the output.")
    lid: LIDConfig = LIDConfig()
    filters: FiltersConfig = FiltersConfig()
    dedup: DedupConfig = DedupConfig()
    mix: MixConfig = MixConfig()
    rehydrate: dict[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description=(
            "FineWeb2 rehydration: minimum minhash_cluster_size → copies of a document (the "
            "largest key not above its cluster size applies); empty: off"))


class AllocationConfig(_Section):
    """Which experts serve which language (or named group); expert 0 is the dense FFN's copy."""

    method: Literal["language", "layermoe", "none"] = "language"
    experts: dict[str, list[Annotated[int, Field(ge=0)]]] = Field(default_factory=dict)
    groups: dict[str, list[LangTag]] = Field(default_factory=dict)
    total_new_experts: int | None = Field(None, ge=1, description=(
        "LayerMoE: new experts over all layers, an explicit budget that overrides "
        "layermoe_budget"))
    layermoe_budget: float = Field(0.6, gt=0.0, le=1.0, description=(
        "LayerMoE: unless total_new_experts is set, this share of the new experts DeltaMoE "
        "adds ((num_experts - 1) per MoE layer), rounded down, at least one per layer"))
    similarity: Literal["new_pairs", "all_pairs"] = Field("new_pairs", description=(
        "LayerMoE's layer similarity: new_pairs (the authors') averages the centroid cosines "
        "of pairs with at least one new language; all_pairs also counts original-original"))
    classifier_layers: int = Field(0, ge=0, description="LayerMoE: most similar layers")


class FreezeConfig(_Section):
    anchor_expert: bool = True
    shared: bool = True


class UpcycleConfig(_Section):
    num_experts: int = Field(4, ge=2)
    top_k: int = Field(2, ge=1)
    layers: Literal["all"] | list[Annotated[int, Field(ge=0)]] = "all"
    router_init: Literal["xavier_normal", "zeros", "normal"] = "xavier_normal"
    router_init_std: float = Field(0.02, gt=0.0)
    expert_noise_std: float = Field(0.0, ge=0.0)
    layout: Literal["per_expert", "fused"] = "per_expert"
    allocation: AllocationConfig = AllocationConfig()
    freeze: FreezeConfig = FreezeConfig()

    @field_validator("top_k")
    @classmethod
    def _top_k_fits(cls, top_k: int, info: ValidationInfo) -> int:
        num_experts = info.data.get("num_experts")
        if num_experts is not None and top_k > num_experts:
            raise ValueError(f"expected int ≤ upcycle.num_experts ({num_experts}), got {top_k}")
        return top_k

    @model_validator(mode="after")
    def _expert_ids_exist(self) -> UpcycleConfig:
        for name, ids in self.allocation.experts.items():
            bad = [i for i in ids if i >= self.num_experts]
            if bad:
                raise ValueError(
                    f"allocation.experts.{name}: expert ids {bad} do not exist "
                    f"(num_experts={self.num_experts})"
                )
        return self


class ReviewConfig(_Section):
    """MoE-LPR stage 2: router-only training on a replay set with the LPR loss."""

    enabled: bool = False
    steps: int = Field(50, ge=1)
    # measured on the synthetic world (4 experts, top-2): 50 steps at 3e-3 with coef 1 take the
    # anchor share of original-language tokens from 0.17 to ≥ 0.94 in every layer; the old
    # 1e-4 / 0.1 left it at 0.26 (the LM loss, which also reaches the routers, dominated)
    lr: float = Field(3e-3, gt=0.0)
    lpr_coef: float = Field(1.0, ge=0.0)
    prior: Literal["anchor", "allocation"] = Field("anchor", description=(
        "the LPR targets (review and train.lpr_coef alike): anchor (MoE-LPR) sends "
        "original-language tokens to expert 0 and leaves new-language tokens free; "
        "allocation sends each language to its allocated experts. Tokens of a language "
        "without an allocation entry are free under both (not in the loss's mean)"))


class TrainConfig(_Section):
    steps: int = Field(1000, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    balance_coef: float = Field(0.01, ge=0.0)
    lpr_coef: float = Field(0.0, ge=0.0)
    classifier_coef: float = Field(1.0, ge=0.0, description=(
        "weight of LayerMoE's classifier loss in CPT, on models with classifier layers"))
    classifier_level: Literal["sequence", "token"] = Field("sequence", description=(
        "classifier loss per sequence (its mean FFN input against its language group, as the "
        "LayerMoE authors train it) or per token"))
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    experts_implementation: Literal["auto", "eager", "grouped_mm", "batched_mm"] = Field(
        "auto", description="MoE experts kernel (transformers' switch; the package's own class "
        "has eager and grouped_mm); auto: grouped_mm on a GPU with a native grouped GEMM, "
        "eager elsewhere (measured faster on CPU)")
    compile: bool = Field(False, description="torch.compile each decoder block's forward")
    prefetch: int = Field(2, ge=0, description="batches loaded ahead in a background thread")
    peak_tflops: float | None = Field(None, gt=0.0, description="per-device peak for train/mfu "
                                      "(default: known GPUs' dense bf16 peak; none on CPU)")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(10, ge=1)
    review: ReviewConfig = ReviewConfig()


TensorFamily = Literal["attention", "mlp", "norm", "embed", "lm_head"]


class GraftConfig(_Section):
    method: GraftMethod = "deltamoe"
    # finite only: a NaN or Inf scale would fail late as an fp32 overflow
    scale: float = Field(1.0, allow_inf_nan=False, description="λ: global scale of Δpost")
    expert_scales: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(allow_inf_nan=False)]
                        ] = Field(default_factory=dict, description="α_e per expert")
    family_scales: dict[TensorFamily, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict)
    density: float = Field(1.0, gt=0.0, le=1.0, description="TIES/DARE share of Δ kept")
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_shard_size: str = Field("2GB", pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$")
    verify: bool = False


class BaselinesConfig(_Section):
    variants: list[Baseline] = Field(default_factory=lambda: ["cpt_dense", "param_delta"])


class EvaluationConfig(_Section):
    suites: list[Suite] = Field(default_factory=lambda: ["synthetic"])
    data_dir: str | None = None
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1)
    num_fewshot: int = Field(0, ge=0)
    max_gen_tokens: int = Field(32, ge=1)
    variants: list[VariantName] | None = None
    log_samples: bool = Field(False, description="keep lm-eval's per-sample outputs as "
                              "artifacts of each variant's evaluation")


class TrackingConfig(_Section):
    """MLflow. ``uri`` unset means ``sqlite:///<run_dir>/mlflow.db``; the env var wins."""

    uri: str | None = None
    experiment: str = "deltamoe"
    tags: dict[str, str] = Field(default_factory=dict)


class StorageConfig(_MaskedOptions, _Section):
    root: str = Field("runs", description="local path or fsspec URI holding runs/<run_name>/")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class StageResources(_Section):
    """What one task of a stage asks Ray for; unset fields take the stage's default."""

    num_cpus: float | None = Field(None, ge=0.0)
    num_gpus: float | None = Field(None, ge=0.0)
    memory: int | None = Field(None, ge=1, description="bytes of RAM Ray reserves for the task")
    resources: dict[str, Annotated[float, Field(gt=0.0)]] = Field(
        default_factory=dict, description="custom resources, e.g. {gpu_node: 0.01}")


class StagesResources(_Section):
    """Resources per kind of stage. Training's also go to every Ray Train worker; evaluation
    takes one GPU per variant when ``resources.use_gpu`` is on; ``report`` is the tables, plots
    and HTML report, built from small results."""

    world: StageResources = StageResources()
    data: StageResources = StageResources()
    upcycle: StageResources = StageResources()
    train: StageResources = StageResources()
    graft: StageResources = StageResources()
    evaluate: StageResources = StageResources()
    report: StageResources = StageResources()


class DriverResources(_Section):
    """Entrypoint resources of a submitted job: where Ray places the workflow's driver (a CPU
    node by default; it only orchestrates)."""

    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    memory: int | None = Field(None, ge=1)
    resources: dict[str, Annotated[float, Field(gt=0.0)]] = Field(default_factory=dict)


class ResourcesConfig(_Section):
    ray_address: str | None = Field(None, description="None: local Ray; 'auto': running one")
    stages: StagesResources = StagesResources()
    max_parallel: int | None = Field(None, ge=1, description=(
        "at most this many stages at once (None: as many as the cluster's resources allow)"))
    driver: DriverResources = DriverResources()
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    launcher: Literal["ray", "inline", "spawn"] = Field("ray", description=(
        "ray: Ray Train TorchTrainer over num_workers workers; inline: the same training loop "
        "in the driver process as one rank (tiny CPU runs, no ~25 s Ray Train setup); spawn: "
        "num_workers local processes in one torch process group, without Ray (one machine)"))


class RunConfig(_Section):
    """A whole expansion run: one file, one fingerprint per stage, one MLflow parent run."""

    run_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    seed: int = 0
    models: ModelsConfig | None = None
    world: WorldConfig | None = None
    languages: LanguagesConfig
    data: DataConfig = DataConfig()
    upcycle: UpcycleConfig = UpcycleConfig()
    train: TrainConfig = TrainConfig()
    graft: GraftConfig = GraftConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    resources: ResourcesConfig = ResourcesConfig()

    def cross_section_issues(self) -> list[tuple[str, str]]:
        """Rules that span sections; pydantic checks each section alone."""
        issues: list[tuple[str, str]] = []
        if self.models is None and self.world is None and self.data.tokenizer is None:
            issues.append(("models", "required unless a synthetic `world` section makes the "
                                     "pair (or, for the data stage alone, data.tokenizer is set)"))
        run_langs = set(self.languages.all)
        alloc = self.upcycle.allocation
        for group, members in alloc.groups.items():
            for tag in members:
                if tag not in run_langs:
                    issues.append((f"upcycle.allocation.groups.{group}",
                                   f"{tag} is not one of the run's languages "
                                   f"({', '.join(sorted(run_langs))})"))
        for name in alloc.experts:
            if name in alloc.groups:
                continue
            try:
                tag = _lang_tag(name)
            except ValueError as err:
                issues.append((f"upcycle.allocation.experts.{name}",
                               "neither a group in upcycle.allocation.groups "
                               f"nor a language: {err}"))
                continue
            if tag not in run_langs:
                issues.append((f"upcycle.allocation.experts.{name}",
                               f"{tag} is not one of the run's languages"))
        for key in ("ratios", "tokens_per_language"):
            for tag in getattr(self.data.mix, key):
                if tag not in run_langs:
                    issues.append((f"data.mix.{key}.{tag}",
                                   f"{tag} is not one of the run's languages"))
        for i, src in enumerate(self.data.sources):
            for tag in src.languages or []:
                if tag not in run_langs:
                    issues.append((f"data.sources.{i}.languages",
                                   f"{tag} is not one of the run's languages"))
        for tag in self.data.lid.thresholds:
            if tag not in run_langs:
                issues.append((f"data.lid.thresholds.{tag}", "not one of the run's languages"))
        if self.train.warmup_steps > self.train.steps:
            issues.append(("train.warmup_steps",
                           f"expected ≤ train.steps ({self.train.steps}), "
                           f"got {self.train.warmup_steps}"))
        return issues

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain JSON data with secrets masked: what stage fingerprints hash."""
        return self.model_dump(mode="json", include={name})[name]
