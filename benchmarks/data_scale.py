"""Data stage at two corpus sizes: does the driver stay flat, and how close is the distributed
stage to raw tokenizer throughput?

Two generated FineWeb2-layout corpora (four languages, ``--small-mb`` and ``--large-mb`` MiB of
text; defaults 104 and 416, with 5 % exact and 2 % near duplicates planted across files) and a
BPE tokenizer trained on a sample are built once under ``--cache`` (default
``~/.cache/deltamoe-bench/data_scale``, outside the repository) and reused. Each size runs in
its own process (so each driver's peak RSS is its own) on a fresh local Ray instance; while the
stage runs, a sampler polls the peak resident memory of the run's Ray worker processes. A third
process reads the large corpus's text with pyarrow and encodes it with raw ``tokenizers``
(``encode_batch_fast``, all cores) — the floor of any tokenizing pipeline — once as a user
calls it and once with the BPE merge cache emptied per language, as the stage does.

Prints, per size: stage seconds, tokens, driver peak RSS, largest worker peak RSS; then
``driver_rss_ratio=<large ÷ small>`` (goal ≤ 1.15), the stage against the cache-emptying raw
run, ``input_ratio`` (the corpus's raw tokens over the stage's time), and last
``ratio=<stage kept tokens/s ÷ raw tokens/s, larger size>`` (goal ≥ 0.8).

Run alone: ``.venv/bin/python benchmarks/data_scale.py [--small-mb 104] [--large-mb 416]
[--cache DIR] [--minhash]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LANGS = ["eng_Latn", "deu_Latn", "swh_Latn", "rus_Cyrl"]
_ALPHABETS = {"eng_Latn": "etaoinshrdlucmfwypvbgk", "deu_Latn": "enisratdhulcgmobwfkzüäö",
              "swh_Latn": "aikumntwhlyesbgozjfdp", "rus_Cyrl": "оеаинтсрвлкмдпуяыьгзбчй"}
_FILE_MB = 26  # MiB of text per parquet file


def _vocab(lang: str, rng: np.random.Generator, n: int = 6000) -> list[str]:
    letters = list(_ALPHABETS[lang])
    return ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(n)]


def _write_file(path: Path, lang: str, mb: int, seed: int) -> None:
    """~``mb`` MiB of documents (Zipf words, 80–900 words each); 5 % exact copies of earlier
    documents of the file (re-cased), 2 % near copies (one word changed)."""
    rng = np.random.default_rng(seed)
    vocab = np.array(_vocab(lang, np.random.default_rng(zlib.crc32(lang.encode()))))
    ranks = np.minimum(rng.zipf(1.2, size=mb * 2**20 // 7), len(vocab)) - 1  # ~7 B a word
    texts: list[str] = []
    at = 0
    while at < len(ranks):
        n = int(rng.integers(80, 900))
        words = vocab[ranks[at:at + n]]
        at += n
        roll = rng.random()
        if texts and roll < 0.05:
            texts.append(texts[int(rng.integers(len(texts)))].upper())
        elif texts and roll < 0.07:
            words = texts[int(rng.integers(len(texts)))].split()
            words[len(words) // 2] = "zzz"
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(words))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path, row_group_size=2048)


def build(cache: Path, small_mb: int, large_mb: int) -> dict[str, Path]:
    """The two corpora (the large one's files are the small one's plus more) and the
    tokenizer, built once: a rerun with the same sizes reuses them."""
    corpora = {}
    for name, mb in (("small", small_mb), ("large", large_mb)):
        root = cache / f"corpus-{mb}mb"
        file_mb = max(1, min(_FILE_MB, mb // len(LANGS)))
        per_lang = max(1, round(mb / len(LANGS) / file_mb))
        for lang in LANGS:
            for i in range(per_lang):
                path = root / "data" / lang / "train" / f"{i:03d}.parquet"
                if not path.exists():
                    _write_file(path, lang, file_mb, seed=zlib.crc32(f"{lang}{i}".encode()))
        corpora[name] = root
    tok_dir = cache / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        sample = [t for lang in LANGS for t in pq.read_table(
            corpora["small"] / "data" / lang / "train" / "000.parquet").column("text")
            .to_pylist()[:2000]]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(sample, trainers.BpeTrainer(
            vocab_size=8192, special_tokens=["<unk>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok_dir.mkdir(parents=True, exist_ok=True)
        tok.save(str(tok_dir / "tokenizer.json"))
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
             "unk_token": "<unk>"}))
    corpora["tokenizer"] = tok_dir
    return corpora


def _text_mb(root: Path) -> float:
    """MiB of text, from the files' metadata (uncompressed column bytes)."""
    total = 0
    for f in sorted(root.rglob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        total += sum(meta.row_group(g).column(0).total_uncompressed_size
                     for g in range(meta.num_row_groups))
    return total / 2**20


def raw_tokens_per_s(root: Path, tokenizer: Path, clear_per_language: bool = False) \
        -> tuple[float, int]:
    """Raw ``tokenizers`` over every file in path order (language by language).
    ``clear_per_language``: empty the BPE merge cache at each language's first file, as the
    stage does (a full cache takes no new words, so the first language keeps it)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    started, tokens, language = time.perf_counter(), 0, None
    for f in sorted(root.rglob("*.parquet")):
        if clear_per_language and f.parent.parent.name != language:
            tok.model._clear_cache()
            language = f.parent.parent.name
        for batch in pq.ParquetFile(f).iter_batches(1024, columns=["text"]):
            tokens += sum(len(e.ids) for e in tok.encode_batch_fast(
                batch.column(0).to_pylist(), add_special_tokens=False))
    return tokens / (time.perf_counter() - started), tokens


def _peak_rss(proc: Any) -> int:
    """The process's peak resident memory so far (Linux ``VmHWM``), else its current RSS."""
    try:
        with open(f"/proc/{proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return proc.memory_info().rss


class _WorkerRSS(threading.Thread):
    """Polls the peak RSS of this run's Ray worker processes (``ray::`` descendants of this
    process: another Ray instance on the machine is not counted) every 0.5 s. The kernel's
    high-water mark holds each process's peak between polls, so polling seldom loses nothing
    and leaves the CPUs to the stage being timed."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            for p in me.children(recursive=True):
                try:
                    if " ".join(p.cmdline()).startswith("ray::"):
                        self.peak = max(self.peak, _peak_rss(p))
                except psutil.Error:  # ended between listing and reading
                    continue
            self.stop.wait(0.5)


def measure(corpus: Path, tokenizer: Path, raw: str | None, minhash: bool) \
        -> dict[str, float]:
    """One size in this process: raw encoding (``raw``: ``raw`` or ``rawclear``), else the
    stage — never both, so the driver's peak RSS is the stage's own."""
    import ray

    from components.config import DataConfig
    from components.data import prepare_data

    out: dict[str, float] = {}
    if raw:
        out["raw_tokens_per_s"], out["raw_tokens"] = raw_tokens_per_s(
            corpus, tokenizer, clear_per_language=raw == "rawclear")
        return out
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False)
    cfg = DataConfig.model_validate({
        "sources": [{"name": "w", "format": "fineweb2", "path": str(corpus)}],
        "seq_len": 1024, "lid": {"backend": "source"}, "batch_size": 1024,
        "filters": {"max_non_alpha_fraction": None}, "mix": {"mode": "all"},
        "dedup": {"exact": True, "minhash": minhash}})
    sampler = _WorkerRSS()
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="data-scale-", dir=corpus.parent) as tmp:
        started = time.perf_counter()
        result = prepare_data(cfg, LANGS, LANGS[:2], tokenizer, Path(tmp) / "out",
                              progress=False)
        out["seconds"] = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    ray.shutdown()
    out["tokens"] = sum(result.tokens_kept.values()) - sum(result.documents_out.values())
    out["dropped"] = sum(n for d in result.dropped.values() for n in d.values())
    out["driver_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["worker_rss"] = sampler.peak
    out["driver_bytes"] = result.driver_bytes_received
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small-mb", type=int, default=104)
    parser.add_argument("--large-mb", type=int, default=416)
    parser.add_argument("--cache", type=Path,
                        default=Path.home() / ".cache" / "deltamoe-bench" / "data_scale")
    parser.add_argument("--minhash", action="store_true", help="near dedup on as well")
    parser.add_argument("--one", nargs=2, metavar=("CORPUS", "RAW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child process of one size
        print(json.dumps(measure(Path(args.one[0]), args.cache / "tokenizer",
                                 None if args.one[1] == "stage" else args.one[1],
                                 args.minhash)))
        return
    corpora = build(args.cache, args.small_mb, args.large_mb)
    figures = {}
    runs = (("raw", "raw"), ("rawclear", "rawclear"), ("small", "stage"), ("large", "stage"))
    for name, mode in runs:
        corpus = corpora["large" if name.startswith("raw") else name]
        cmd = [sys.executable, __file__, "--cache", str(args.cache), "--one", str(corpus), mode]
        if args.minhash:
            cmd.append("--minhash")
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{name} run failed:\n{done.stderr[-3000:]}")
        figures[name] = json.loads(done.stdout.strip().splitlines()[-1])
        if name.startswith("raw"):
            continue
        f = figures[name]
        print(f"{name}: {_text_mb(corpora[name]):.0f} MiB text, stage {f['seconds']:.1f} s, "
              f"{f['tokens']:,.0f} tokens ({f['tokens'] / f['seconds']:,.0f}/s), "
              f"{f['dropped']:,.0f} documents dropped; driver peak RSS "
              f"{f['driver_rss'] / 2**20:.0f} MiB, largest worker peak RSS "
              f"{f['worker_rss'] / 2**20:.0f} MiB; driver received {f['driver_bytes']:,.0f} B")
    large, raw, clear = figures["large"], figures["raw"], figures["rawclear"]
    print(f"raw tokenizers on the large corpus: {raw['raw_tokens_per_s']:,.0f} tokens/s "
          f"({raw['raw_tokens']:,.0f} tokens)")
    # The stage empties the BPE cache per language and raw tokenizers does not: the same raw
    # run with that one change, so the reader sees how much of the ratio the cache explains.
    print(f"raw tokenizers, BPE cache emptied per language: {clear['raw_tokens_per_s']:,.0f} "
          f"tokens/s; stage ÷ it: "
          f"{large['tokens'] / large['seconds'] / clear['raw_tokens_per_s']:.3f}")
    # Input throughput: the corpus's raw token count over the stage's time (dedup drops
    # 7.5 % of the text before it is tokenized; the headline credits kept tokens only).
    print(f"input_ratio={raw['raw_tokens'] / large['seconds'] / raw['raw_tokens_per_s']:.3f}")
    print(f"driver_rss_ratio={large['driver_rss'] / figures['small']['driver_rss']:.3f}")
    print(f"ratio={large['tokens'] / large['seconds'] / raw['raw_tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
