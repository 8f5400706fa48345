"""The ``world`` section: the synthetic world that makes a demo run's model pair."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from components.config.names import DenseType, LangTag
from components.config.section import _Section


class WorldConfig(_Section):
    """The synthetic demo world; when set it makes the model pair if ``models`` is absent."""

    seed: int = 0
    arch: DenseType = "llama"
    languages: list[LangTag] = Field(
        default_factory=lambda: ["eng_Latn", "deu_Latn", "swh_Latn", "rus_Cyrl"], description=(
            "languages the world writes (of eng_Latn, deu_Latn, swh_Latn, tur_Latn, rus_Cyrl); "
            "must hold the run's languages"))
    original: list[LangTag] = Field(
        default_factory=lambda: ["eng_Latn", "deu_Latn"], min_length=1, description=(
            "the languages the base knows (keep it equal to the run's languages.original); the "
            "others are new"))
    num_people: int = Field(60, ge=8, description=(
        "people of the original languages' base text: eval_people of them are asked about "
        "(synthetic_closed_original), the rest are the SFT people"))
    eval_people: int = Field(20, ge=1, description=(
        "original-fact people (at most num_people / 2); every question form of every attribute "
        "(10 questions each)"))
    new_fact_people: int = Field(20, ge=1, description=(
        "per new language, people whose facts are only in its CPT corpus (synthetic_closed_new,"
        " 10 questions each)"))
    background_people: int = Field(200, ge=0, description=(
        "per new language, never-evaluated people of its small share of the base text"))
    bios_per_person: int = Field(30, ge=1, description=(
        "biographies (paraphrased) of every original-language person in each original "
        "language's base text: how often the base sees each fact, and, through "
        "new_language_share, how much new-language text the base sees (too little and the "
        "new languages' CPT text holds ids the base hardly saw: world.json's coverage)"))
    new_language_share: float = Field(0.05, ge=0.0, lt=1.0, description=(
        "share of the base's pre-training tokens in the new languages (split evenly), from "
        "text that is not their CPT text and holds no evaluated fact"))
    tokenizer_alpha: float = Field(0.3, gt=0.0, le=1.0, description=(
        "the tokenizer trains on the base text with each language sampled in proportion to "
        "share ** tokenizer_alpha, as multilingual tokenizers are (XLM-R, mT5: 0.3), so the new "
        "languages' common words are tokens of their own; 1 trains on the text as it is"))
    question_share: float = Field(0.25, ge=0.0, le=1.0, description=(
        "share of the generic sentences in every language's text (base, CPT, held-out) that "
        "are a question about a passer-by and its answer, as real text asks questions: "
        "without them every language's question words are ids no model trained (0 keeps "
        "world v5's text)"))
    openbook_people: int = Field(60, ge=1, description=(
        "invented people, in no corpus, whose biographies are synthetic_openbook's contexts "
        "(5 questions each)"))
    openbook_train_people: int = Field(600, ge=1, description=(
        "as many other invented people for post-training's open-book rows: so many that the "
        "answers cannot be memorised and copying from the context is what is learnt"))
    openbook_context_facts: int = Field(3, ge=1, le=5, description=(
        "facts in an open-book context: the asked one and this many minus one of the same "
        "person's others as distractors (a short context, as the open-book task asks)"))
    heldout_docs: int = Field(300, ge=1, description=(
        "fact-free held-out documents per language (synthetic_lm)"))
    docs_per_language: int = Field(800, ge=10, description=(
        "CPT documents per language (biographies: two thirds new-fact, one third SFT people; "
        "an original language replays this many of its base documents)"))
    vocab_size: int = Field(4096, ge=300, description=(
        "tokenizer vocabulary at most (merges need 100 occurrences in the base text, so the "
        "world's small text may stop below it)"))
    base_steps: int = Field(300, ge=0, description=(
        "pre-training steps that make the demo's base (models/base) from the world's random "
        "model on the original languages; 0 takes the random model itself as the base"))
    model_hidden_size: int = Field(192, ge=16, description="the tiny base's hidden size")
    model_layers: int = Field(4, ge=1, description="its decoder layers")
    model_intermediate_size: int = Field(512, ge=16, description="its FFN width")
    base_lr: float = Field(3e-3, gt=0.0, description=(
        "peak learning rate of the base's pre-training (continued pre-training, train.lr, "
        "stays below it, as it does for real bases)"))
    post_steps: int = Field(150, ge=1, description=(
        "supervised fine-tuning steps that make the post-trained sibling (models/post) on the "
        "original languages' instruction data"))
    post_replay: float = Field(0.3, ge=0.0, lt=1.0, description=(
        "share of post-training's rows that replay the base's own pre-training text (loss on "
        "every token), so post-training keeps the base's language modelling as real "
        "post-training does (without it a tiny model's bits/byte grew 3-4.5x and its cloze "
        "fell from 0.94 to 0.62, and every grafted Δpost carried that)"))
    post_lr: float = Field(3e-4, gt=0.0, description=(
        "peak learning rate of that fine-tuning (train.lr is for continued pre-training; "
        "post-training takes a smaller one, as real instruct models do)"))

    def generator_args(self) -> dict[str, Any]:
        """The keyword arguments of ``components.synthetic.build_world``: every setting but the
        training budgets of the base and its post-trained sibling, which the train stage uses."""
        return self.model_dump(exclude={"base_steps", "base_lr", "post_steps", "post_lr"})
