"""The data stage's parts one at a time, without Ray: filters with per-language thresholds,
exact and MinHash dedup, the mix arithmetic, lossless packing into shards, LID tagging/filtering,
UTF-8 repair, jsonl parsing and unknown language tags. Each asserts exact counts or tokens."""

from __future__ import annotations

import json
import random
import re
import unicodedata
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from components.config import DataConfig, DataSource, FiltersConfig, MixConfig
from components.data import DataError
from components.data.dedup import MinHasher, exact_hashes, lsh_params, normalize
from components.data.filters import QualityFilter, duplicate_line_fraction, thresholds_for
from components.data.lid import LanguageTagger, assign_languages, same_language
from components.data.lsh import band_hashes, bucket_edges, connected_components, first_occurrences
from components.data.mix import mix_shares, plan_mix
from components.data.pack import LanguageQuota, SequencePacker, ShardWriter, with_eos
from components.data.readers import DOC_SCHEMA, JsonlReader, repair_utf8, resolve_source
from components.data.textops import collapse_whitespace, has_newline, value_slices
from components.data.tokenize import TokenizeBatch, token_lists

# ----------------------------------------------------------------------------- filters


def test_filters_first_failing_reason_and_per_language_override() -> None:
    filters = FiltersConfig.model_validate({
        "min_chars": 20, "max_chars": 200, "max_duplicate_line_fraction": 0.3,
        "max_non_alpha_fraction": 0.5,
        "per_language": {"zho_Hans": {"min_chars": 4}, "swh_Latn": {"max_chars": None}}})
    assert thresholds_for(filters, "zho_Hans").min_chars == 4
    assert thresholds_for(filters, "zho_Hans").max_chars == 200  # only what the override sets
    assert thresholds_for(filters, "swh_Latn").max_chars is None
    qf = QualityFilter(filters, ["eng_Latn", "zho_Hans", "swh_Latn"])
    long = "neno " * 60
    texts = ["short one", "这是中文句子", "a fine sentence of plain words here",
             "menu\nmenu\nmenu\nhome page text", "12345 67890 !!! ??? 1234567 ### abc",
             long, long, "x" * 10 + "1" * 15]
    langs = ["eng_Latn", "zho_Hans", "eng_Latn", "eng_Latn", "eng_Latn", "eng_Latn",
             "swh_Latn", "eng_Latn"]
    reasons = qf.reasons(pa.array(texts), langs)
    assert reasons == ["min_chars", "", "", "duplicate_lines", "non_alpha", "max_chars", "",
                       "non_alpha"]
    assert duplicate_line_fraction("a\nb\na\na") == pytest.approx(0.5)
    assert duplicate_line_fraction("one line") == 0.0


def _non_alpha_share(text: str) -> float:
    """The filter's definition, one character at a time: characters that are neither letters,
    marks nor whitespace, over the characters that are not whitespace (1 when there are none)."""
    space = set("\t\n\f\r ")
    nonspace = [c for c in text if c not in space]
    other = [c for c in nonspace if unicodedata.category(c)[0] not in "LM"]
    return len(other) / len(nonspace) if nonspace else 1.0


def test_non_alpha_share_is_exact_across_scripts_and_whitespace() -> None:
    """The Arrow kernels (one whitespace-collapsing pass shared with the dedup hash, then a
    single-character count of the complement class) agree with a per-character count."""
    texts = ["Hello, world! 42", "ภาษาไทย มีสระ ั ิ ่ และ ๑๒๓", "Привет,\tмир...\r\n\n 2024 г.",
             "日本語のテキスト。数字１２３", "  a  ", "\n\n\t", "x\u00a0y\vz — «ok»",
             "ÅÄÖ åäö 😀😀", "e\u0301te\u0301", "###", ""]
    for text in texts:
        share = _non_alpha_share(text)
        for bound, expected in ((share - 1e-9, "non_alpha"), (min(share + 1e-9, 1.0), "")):
            if bound < 0:
                continue
            filters = FiltersConfig.model_validate({
                "min_chars": None, "max_chars": None, "max_duplicate_line_fraction": None,
                "max_non_alpha_fraction": bound})
            got, = QualityFilter(filters, ["eng_Latn"]).reasons(pa.array([text]), ["eng_Latn"])
            assert got == expected, (text, share)


def test_filters_off_when_none() -> None:
    filters = FiltersConfig.model_validate({"min_chars": None, "max_chars": None,
                                            "max_duplicate_line_fraction": None,
                                            "max_non_alpha_fraction": None})
    qf = QualityFilter(filters, ["eng_Latn"])
    assert qf.reasons(pa.array(["", "1", "a\na\na"]), ["eng_Latn"] * 3) == ["", "", ""]


# ----------------------------------------------------------------------------- dedup


def test_collapse_whitespace_is_every_run_to_one_space() -> None:
    """The kernel matches only runs that change (two or more, or one non-space): its output is
    a plain ``[\\t\\n\\f\\r ]+`` → space, and other Unicode spaces (NBSP, \\v) stay."""
    rng = random.Random(3)
    pieces = ["a", "bc", "ж", "中", " ", "  ", "\t", "\n", "\r\n", "\f", "\v", "\u00a0",
              "\u2003", " \n ", ""]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randrange(0, 30)))
             for _ in range(2000)] + ["", " ", "\n\n", "x"]
    expected = [re.sub(r"[\t\n\f\r ]+", " ", t) for t in texts]
    assert collapse_whitespace(pa.array(texts)).to_pylist() == expected




@pytest.mark.parametrize("kind", [pa.string(), pa.large_string()])
def test_buffer_kernels_match_arrow_on_slices_nulls_and_empty_values(kind) -> None:
    """The numpy views read the right bytes of a sliced array whose first value does not start
    at byte 0, with nulls and empty strings (read as empty)."""
    values = ["a\nb", "", None, "x", "\n", "yy\n\nz", "ü", None, "plain"]
    for arr in (pa.array(values, kind), pa.array(values, kind).slice(2),
                pa.array(values, kind).slice(3, 4), pa.array([], kind)):
        expected = [(v or "").encode() for v in arr.to_pylist()]
        assert [bytes(v) for v in value_slices(arr)] == expected
        assert has_newline(arr).tolist() == [b"\n" in v for v in expected]


def test_exact_hash_ignores_case_and_spacing_only() -> None:
    texts = pa.array(["Hello  World\n", "hello world", "hello worlds", " HELLO\tWORLD"])
    assert normalize(texts).to_pylist() == ["hello world"] * 2 + ["hello worlds",
                                                                   "hello world"]
    h = exact_hashes(texts).to_pylist()
    assert h[0] == h[1] == h[3] != h[2]
    assert all(len(x) == 16 for x in h)


def _words(rng: random.Random, n: int) -> list[str]:
    return [f"w{rng.randrange(5000)}" for _ in range(n)]


def test_minhash_estimates_jaccard_and_index_finds_near_duplicates() -> None:
    rng = random.Random(0)
    hasher = MinHasher(num_perm=128, seed=3)
    base = _words(rng, 200)
    near = list(base)
    near[100] = "changed"  # one word: 5 of 196 shingles differ on each side
    other = _words(rng, 200)
    sig = {k: hasher.signature(" ".join(v)) for k, v in
           (("base", base), ("near", near), ("other", other))}
    assert sig["base"].dtype == np.uint32 and sig["base"].shape == (128,)
    # same seed, another instance (another Ray worker): the same signature
    assert np.array_equal(MinHasher(128, seed=3).signature(" ".join(base)), sig["base"])
    shingles = {k: set(hasher.shingles(" ".join(v)).tolist()) for k, v in
                (("base", base), ("near", near))}
    true_j = len(shingles["base"] & shingles["near"]) / len(shingles["base"] | shingles["near"])
    est_j = float(np.mean(sig["base"] == sig["near"]))
    assert abs(est_j - true_j) < 0.1, (est_j, true_j)
    assert float(np.mean(sig["base"] == sig["other"])) < 0.05
    # banded LSH: the near copy shares a bucket with its original, the other text none
    bands, rows = lsh_params(0.8, 128)
    h = band_hashes(np.stack([sig["base"], sig["other"], sig["near"]]), bands, rows)
    assert (h[0] == h[2]).any() and not (h[0] == h[1]).any()
    assert np.array_equal(h, band_hashes(np.stack([sig["base"], sig["other"], sig["near"]]),
                                         bands, rows))  # every worker buckets alike
    column = hasher.signatures(pa.array([" ".join(base), " ".join(other)]))
    assert np.array_equal(np.asarray(column[1].values), sig["other"])


def test_lsh_params_fit_the_permutations() -> None:
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128 and bands > 1 and rows > 1
    # the S-curve passes near the threshold: high recall above, low hit rate well below
    hit = lambda s: 1 - (1 - s ** rows) ** bands  # noqa: E731
    assert hit(0.95) > 0.99 and hit(0.9) > 0.85 and hit(0.5) < 0.01


def test_exact_first_occurrence_is_the_smallest_key_per_scope() -> None:
    # rows in arrival order: key 9 arrives before key 2 with the same hash; scope 1 is apart
    scope = np.array([0, 0, 0, 1, 0])
    h1 = np.array([5, 5, 7, 5, 5], dtype=np.uint64)
    h2 = np.zeros(5, dtype=np.uint64)
    key = np.array([9, 2, 4, 3, 11])
    assert first_occurrences(scope, h1, h2, key).tolist() == [False, True, True, True, False]


def test_bucket_edges_are_stars_from_the_smallest_key() -> None:
    # bucket (scope 0, band 0, hash 1): keys 8, 3, 5; a lone bucket; a bucket in another scope
    scope = np.array([0, 0, 0, 0, 1, 1])
    band = np.array([0, 0, 0, 1, 0, 0])
    bhash = np.array([1, 1, 1, 1, 1, 1], dtype=np.uint64)
    key = np.array([8, 3, 5, 8, 20, 21])
    u, v = bucket_edges(scope, band, bhash, key)
    assert sorted(zip(u.tolist(), v.tolist(), strict=True)) == [(3, 5), (3, 8), (20, 21)]


def test_connected_components_label_each_node_with_its_smallest_key() -> None:
    # a chain 40-30-20-10 given out of order, a star around 7, and a separate pair
    u = np.array([30, 20, 10, 7, 7, 100])
    v = np.array([40, 30, 20, 50, 60, 101])
    nodes, labels = connected_components(u, v)
    assert dict(zip(nodes.tolist(), labels.tolist(), strict=True)) == {
        7: 7, 10: 10, 20: 10, 30: 10, 40: 10, 50: 7, 60: 7, 100: 100, 101: 100}
    # a long path in reverse order still converges to one label (pointer jumping)
    path = np.arange(1000, dtype=np.int64)[::-1]
    nodes, labels = connected_components(path[1:], path[:-1])
    assert len(nodes) == 1000 and set(labels.tolist()) == {0}
    empty = connected_components(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert len(empty[0]) == 0


# ----------------------------------------------------------------------------- mix


def test_mix_mode_all_uses_every_token_and_reports_shares() -> None:
    mix = MixConfig.model_validate({"mode": "all", "tokens_per_language": {"deu_Latn": 100}})
    plan = plan_mix({"eng_Latn": 1000, "deu_Latn": 5000, "swh_Latn": 64}, ["eng_Latn",
                    "deu_Latn", "swh_Latn"], ["eng_Latn", "deu_Latn"], mix, seq_len=32)
    assert plan.sequences == {"eng_Latn": 31, "deu_Latn": 3, "swh_Latn": 2}
    assert plan.requested == {"eng_Latn": 1000, "deu_Latn": 100, "swh_Latn": 64}


def test_mix_shares_with_ratios_and_replay() -> None:
    mix = MixConfig.model_validate({"ratios": {"swh_Latn": 3, "rus_Cyrl": 1},
                                    "replay_ratio": 0.2})
    shares = mix_shares(["eng_Latn", "deu_Latn", "swh_Latn", "rus_Cyrl"],
                        ["eng_Latn", "deu_Latn"], mix)
    assert shares == pytest.approx({"swh_Latn": 0.6, "rus_Cyrl": 0.2, "eng_Latn": 0.1,
                                    "deu_Latn": 0.1})
    bad = MixConfig.model_validate({"ratios": {"swh_Latn": 1.0}})
    with pytest.raises(DataError, match="rus_Cyrl"):
        mix_shares(["eng_Latn", "swh_Latn", "rus_Cyrl"], ["eng_Latn"], bad)


def test_plan_mix_limited_by_scarcest_language_and_budget() -> None:
    langs, orig = ["eng_Latn", "swh_Latn"], ["eng_Latn"]
    mix = MixConfig.model_validate({"replay_ratio": 0.25})
    # swh 3000 tokens at share 0.75 → total 4000 → eng gets 1000 of its 10000
    plan = plan_mix({"eng_Latn": 10_000, "swh_Latn": 3000}, langs, orig, mix, seq_len=10)
    assert plan.sequences == {"eng_Latn": 100, "swh_Latn": 300}
    assert not plan.scaled_down
    budget = MixConfig.model_validate({"replay_ratio": 0.25, "token_budget": 2000})
    plan = plan_mix({"eng_Latn": 10_000, "swh_Latn": 3000}, langs, orig, budget, seq_len=10)
    assert plan.requested == {"swh_Latn": 1500, "eng_Latn": 500}
    assert plan.sequences == {"eng_Latn": 50, "swh_Latn": 150}
    # a budget the data cannot fill: both scaled down, the proportions kept
    big = MixConfig.model_validate({"replay_ratio": 0.25, "token_budget": 100_000})
    plan = plan_mix({"eng_Latn": 10_000, "swh_Latn": 3000}, langs, orig, big, seq_len=10)
    assert plan.scaled_down and plan.sequences == {"eng_Latn": 100, "swh_Latn": 300}
    pinned = MixConfig.model_validate({"tokens_per_language": {"eng_Latn": 555}})
    plan = plan_mix({"eng_Latn": 10_000, "swh_Latn": 3000}, langs, orig, pinned, seq_len=10)
    assert plan.sequences == {"eng_Latn": 55, "swh_Latn": 300}


# ----------------------------------------------------------------------------- pack


def test_with_eos_and_token_lists() -> None:
    column = token_lists([[5, 6, 7], [], [8]])
    assert column.type == pa.list_(pa.int32())
    flat, starts = with_eos(column.slice(0, 3), eos=0)
    assert flat.tolist() == [5, 6, 7, 0, 0, 8, 0]
    assert starts.tolist() == [0, 4, 5]
    flat, starts = with_eos(column.slice(1, 2), eos=0)  # a sliced column keeps its offsets
    assert flat.tolist() == [0, 8, 0] and starts.tolist() == [0, 1]


def test_packer_is_lossless_never_mixes_languages_and_splits_head_tail(tmp_path) -> None:
    fs = fsspec.filesystem("file")
    writer = ShardWriter(fs, str(tmp_path), seq_len=4, rows_per_shard=3)
    quotas = {"a": LanguageQuota(total=5, train=3, validation=1),
              "b": LanguageQuota(total=2, train=2, validation=0)}
    packer = SequencePacker(writer, 4, quotas, ["s0", "s1"])
    stream_a = np.arange(1, 23, dtype=np.int32)  # 22 tokens: 5 sequences + 2 left over
    for chunk, src in ((stream_a[:7], 0), (stream_a[7:15], 1), (stream_a[15:], 0)):
        packer.add("a", chunk, np.full(len(chunk), src))
    packer.add("b", np.arange(100, 109, dtype=np.int32), np.zeros(9, dtype=np.int64))
    writer.close()
    assert packer.leftover() == {"a": 2, "b": 1}

    def read(split: str, lang: str) -> tuple[list[list[int]], list[str]]:
        files = sorted((tmp_path / split).glob(f"{lang}-*.parquet"))
        tables = [pq.read_table(f) for f in files]
        rows = [r for t in tables for r in t.column("input_ids").to_pylist()]
        assert {x for t in tables for x in t.column("lang").to_pylist()} <= {lang}
        return rows, [s for t in tables for s in t.column("source").to_pylist()]

    train_a, src_a = read("train", "a")
    val_a, _ = read("validation", "a")
    assert train_a == stream_a[:12].reshape(3, 4).tolist()  # sequences 0..2
    assert val_a == [stream_a[16:20].tolist()]  # sequence 4 (the tail); 3 left out by the mix
    assert src_a == ["s0", "s0", "s1"]  # the source of each sequence's first token
    train_b, _ = read("train", "b")
    assert train_b == [[100, 101, 102, 103], [104, 105, 106, 107]]
    assert len(list((tmp_path / "train").glob("a-*.parquet"))) == 1  # 3 rows per shard
    assert pq.read_schema(tmp_path / "train" / "a-00000.parquet").field(
        "input_ids").type == pa.list_(pa.int32())


# ----------------------------------------------------------------------------- readers, LID


def test_repair_utf8_counts_replacements() -> None:
    column = pa.array([b"ok", b"bad\xff\xfeend", None, "keep \ufffd".encode()], pa.binary())
    texts, counts = repair_utf8(column)
    assert texts.to_pylist() == ["ok", "bad\ufffd\ufffdend", "", "keep \ufffd"]
    assert counts.tolist() == [0, 2, 0, 0]  # a replacement char already there is not one
    valid, zero = repair_utf8(pa.array(["fine", None]))
    assert valid.to_pylist() == ["fine", ""] and zero.tolist() == [0, 0]


def test_jsonl_lines_unknown_labels_and_broken_lines_are_counted_drops() -> None:
    source = DataSource.model_validate({"name": "j", "format": "jsonl", "path": "x",
                                        "language_column": "lang"})
    blob = b"\n".join([
        json.dumps({"text": "habari", "lang": "sw"}).encode(),
        json.dumps({"text": "hello", "lang": "en"}).encode(),
        json.dumps({"text": "???", "lang": "xx_Fake"}).encode(),
        b"{not json",
        json.dumps({"body": "no text column on this line"}).encode(),
        b"",
        b'{"text": "caf\xe9 bad byte", "lang": "fr"}',
    ])
    files = pa.table({"bytes": pa.array([blob], pa.binary())})
    table = JsonlReader(source).split_lines(files, "")
    assert table.schema == DOC_SCHEMA
    assert table.column("label").to_pylist() == ["swh_Latn", "eng_Latn", "?xx_Fake", "", "",
                                                 "fra_Latn"]
    assert table.column("drop").to_pylist() == ["", "", "unknown_language", "bad_json",
                                                "no_text", ""]
    assert table.column("bad_utf8").to_pylist() == [0, 0, 0, 0, 0, 1]
    assert table.column("text").to_pylist()[-1] == "caf\ufffd bad byte"


def test_unknown_language_tag_in_config_is_named() -> None:
    with pytest.raises(ValidationError, match="unknown language tag 'xx_Fake'"):
        DataConfig.model_validate({"sources": [{"name": "a", "format": "jsonl", "path": "p",
                                                "languages": ["xx_Fake"]}]})
    with pytest.raises(ValidationError, match="unknown language tag 'qq_Latn'"):
        DataConfig.model_validate({"mix": {"ratios": {"qq_Latn": 1.0}}})


def test_data_only_config_needs_no_models_and_iso_codes_map_to_layout_tags() -> None:
    from components.config import parse_config
    from components.languages import canonical_tag, fineweb2_tag

    cfg = parse_config({"run_name": "d", "languages": {"original": ["en"], "new": ["zh"]},
                        "data": {"tokenizer": "/some/tokenizer"}})
    assert cfg.models is None and cfg.languages.new == ["zho_Hans"]
    with pytest.raises(ValueError, match="models"):
        parse_config({"run_name": "d", "languages": {"original": ["en"], "new": ["sw"]}})
    assert fineweb2_tag("zh") == "cmn_Hani" and canonical_tag("cmn") == "cmn_Hani"
    assert fineweb2_tag("swh_Latn") == "swh_Latn"


def test_max_chars_has_a_default_and_rehydration_copies_by_cluster_size() -> None:
    from components.data.docops import rehydration_copies

    assert FiltersConfig().max_chars == 100_000
    sizes = np.array([1, 2, 3, 4, 5, 99, 100, 1000])
    assert rehydration_copies(sizes, {2: 2, 5: 3, 100: 1}).tolist() == [1, 2, 2, 2, 3, 3, 1, 1]
    assert rehydration_copies(sizes, {}).tolist() == [1] * 8


def _docs(texts: list[str], labels: list[str]) -> pa.Table:
    n = len(texts)
    return pa.Table.from_arrays([pa.array(texts), pa.array(labels), pa.array(["s"] * n),
                                 pa.array([0] * n, pa.int32()), pa.array([""] * n)],
                                schema=DOC_SCHEMA)


def test_assign_languages_filter_mode() -> None:
    batch = _docs(["a", "b", "c", "d", "e"], ["swh_Latn", "swh_Latn", "eng_Latn", "tur_Latn", ""])
    out = assign_languages(batch, ["swh_Latn", "eng_Latn", "eng_Latn", "tur_Latn", "swh_Latn"],
                           np.array([0.9, 0.99, 0.4, 0.9, 0.8], np.float32),
                           languages=["swh_Latn", "eng_Latn"], mode="filter", threshold=0.5,
                           thresholds={"swh_Latn": 0.85})
    assert out.column("lang").to_pylist() == ["swh_Latn", "swh_Latn", "eng_Latn", "tur_Latn",
                                              "swh_Latn"]
    assert out.column("drop").to_pylist() == ["", "lid_mismatch", "lid_low_score",
                                              "not_run_language", "lid_low_score"]
    tagged = assign_languages(batch, ["eng_Latn"] * 5, np.ones(5, np.float32),
                              languages=["swh_Latn", "eng_Latn"], mode="tag", threshold=0.5,
                              thresholds={})
    assert tagged.column("drop").to_pylist() == ["", "", "", "not_run_language", ""]
    assert tagged.column("lid").to_pylist() == ["eng_Latn"] * 5


def test_py3langid_maps_codes_to_the_runs_tags() -> None:
    assert same_language("srp_Cyrl", "srp_Latn") and not same_language("eng_Latn", "deu_Latn")
    tagger = LanguageTagger("py3langid", ["swh_Latn", "eng_Latn", "deu_Latn"], "tag")
    texts = ["The weather is lovely today and we are going to walk in the park together.",
             "Das Wetter ist heute schön und wir gehen zusammen im Park spazieren.",
             "Hali ya hewa ni nzuri leo na tutakwenda kutembea pamoja katika bustani.",
             "Le temps est magnifique aujourd'hui et nous allons nous promener ensemble."]
    out = tagger(_docs(texts, [""] * 4))
    assert out.column("lid").to_pylist() == ["eng_Latn", "deu_Latn", "swh_Latn", "fra_Latn"]
    assert out.column("drop").to_pylist() == ["", "", "", "not_run_language"]
    assert all(0.0 <= s <= 1.0 for s in out.column("lid_score").to_pylist())


def test_tokenize_batch_encodes_kept_documents_only(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    batch = _docs(["hello world", "world again hello", "nope"], ["", "", ""])
    batch = batch.set_column(4, "drop", pa.array(["", "", "min_chars"]))
    out = TokenizeBatch(tok.to_str())(batch)
    assert "text" not in out.column_names
    assert out.column("input_ids").to_pylist() == [[1, 2], [2, 3, 1], []]


def test_tokenize_batch_ids_do_not_depend_on_the_language_order() -> None:
    """Told a new language, the encoder empties the BPE merge cache (a full cache never takes
    another language's words); the ids are those of a fresh tokenizer whatever came before."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = {lang: ["".join(rng.choice(letters) for _ in range(rng.randrange(2, 9)))
                    for _ in range(300)]
             for lang, letters in (("eng", "etaoinshr"), ("rus", "оеаинтср"))}
    texts = {lang: [" ".join(rng.choice(w) for _ in range(40)) for _ in range(50)]
             for lang, w in words.items()}
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts["eng"] + texts["rus"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fresh = {lang: TokenizeBatch(tok.to_str())(_docs(t, [""] * len(t)))
             .column("input_ids").to_pylist() for lang, t in texts.items()}
    shared = TokenizeBatch(tok.to_str())
    rust = shared.tokenizer
    cleared: list[str] = []

    class Model:  # the Rust objects take no new attributes: stand-ins that record the clears
        def _clear_cache(self) -> None:
            cleared.append(lang)
            rust.model._clear_cache()

    class Spy:
        model = Model()

        def encode_batch_fast(self, *args: Any, **kwargs: Any) -> Any:
            return rust.encode_batch_fast(*args, **kwargs)

    shared.tokenizer = Spy()
    for lang in ("eng", "eng", "rus", "rus", "eng"):
        out = shared(_docs(texts[lang], [""] * len(texts[lang])), lang)
        assert shared.cached_language == lang
        assert out.column("input_ids").to_pylist() == fresh[lang]
    assert cleared == ["eng", "rus", "eng"]  # once per change of language, not per batch


def test_source_versions_change_with_the_bytes_not_with_a_reread(tmp_path) -> None:
    """The data stage's fingerprint sees a corpus edited in place to the same size (it listed
    names and sizes only before); reading it again changes nothing."""
    import os

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    doc = corpus / "a.jsonl"
    doc.write_text(json.dumps({"text": "Habari ya asubuhi."}) + "\n")
    os.utime(doc, ns=(1_700_000_000_000_000_000,) * 2)
    source = DataSource(name="c", format="jsonl", path=str(corpus), languages=["swh_Latn"])
    first = resolve_source(source, ["swh_Latn"]).versions()
    assert first == resolve_source(source, ["swh_Latn"]).versions()
    assert [(p.rsplit("/", 1)[1], size) for p, size, _ in first] == [("a.jsonl", 31)]
    doc.write_text(json.dumps({"text": "Habari ya jioni!!!"}) + "\n")  # same size
    os.utime(doc, ns=(1_700_000_100_000_000_000,) * 2)
    second = resolve_source(source, ["swh_Latn"]).versions()
    assert second[0][1] == first[0][1] and second[0][2] != first[0][2]

    fs = fsspec.filesystem("memory")  # a store without mtimes: its own version key
    fs.pipe("/versions-test/b.jsonl", b'{"text": "Jambo"}\n')
    remote = DataSource(name="m", format="jsonl", path="memory://versions-test",
                        languages=["swh_Latn"])
    (path, size, version), = resolve_source(remote, ["swh_Latn"]).versions()
    assert path.endswith("b.jsonl") and size == 18 and version != "None"
    fs.rm("/versions-test", recursive=True)
