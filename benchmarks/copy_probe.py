"""Can the world's models copy a word they read? The ability ParamΔ's transfer stands on.

    python benchmarks/copy_probe.py RUN_DIR [--variants post,param_delta] [--items 150]
        [--capacity]

RUN_DIR is one seed's run folder of ``deltamoe reproduce`` (``<storage.root>/<run>-seed<N>``).
Open-book answers are copied from the context, so a post-trained model that has learnt to copy
should answer a new language's question with the new language's word it read, whatever else
it does not understand. Three measures say whether the models copy at all:

- **foreign values** (each variant): the original languages' open-book items with every value
  word replaced by a new language's word for the same value. Exact match on the replaced word
  is a copy; the page also counts answers that are an original-language value word (the
  closed vocabulary post-training taught) and the original-language word of the right value
  (a translation, not a copy).
- **verbatim repeat** (the base): a fresh person's fact sentence, two of their other facts,
  then the same sentence again up to its value. The most likely of the attribute's six values
  is right by chance 1/6 and always by copying.
- **capacity** (``--capacity``, about 100 s per 500 steps on 2 cores): the world's untrained
  model, at the base's learning rate and steps, trained on nothing but a random 32-token span
  repeated four times; the share of repeated tokens it predicts. Induction this plain is the
  first thing real bases learn.

The last line is ``ratio=<the first variant's exact match on foreign values ÷ its exact match
on the same items unchanged>`` (post by default), averaged over the original and new languages:
1 means it copies what it reads, 0 that it picks among the answer words post-training gave it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.synthetic.grammar import ATTRIBUTES, LANGUAGES
from components.synthetic.texts import Person, biography
from components.train.schedule import lr_factor


def _rows(run: Path, lang: str, items: int) -> list[dict[str, Any]]:
    path = run / "world" / "eval" / lang / "openbook.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()][:items]


def _answer(model: Any, tok: Any, text: str) -> str:
    """Greedy, as the evaluation decodes: up to the first newline, stripped."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()


def swap_values(text: str, source: str, target: str) -> str:
    """Every value word of ``source`` in ``text`` replaced by ``target``'s word for that value."""
    src, dst = LANGUAGES[source], LANGUAGES[target]
    table = {w: dst.values[a][k] for a in ATTRIBUTES for k, w in enumerate(src.values[a])}
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, table)) + r")\b")
    return pattern.sub(lambda m: table[m.group(0)], text)


def foreign_values(model: Any, tok: Any, run: Path, original: list[str], new: list[str],
                   items: int) -> dict[str, dict[str, float]]:
    """Exact match on the unchanged items, then per new language: copy, closed-vocabulary and
    translation rates on the same items with that language's value words."""
    people = {p["name"]: p["attributes"] for p in
              json.loads((run / "world" / "world.json").read_text(encoding="utf-8"))["people"]}
    out: dict[str, dict[str, float]] = {}
    for source in original:
        rows = _rows(run, source, items)
        spec = LANGUAGES[source]
        own = {w for a in ATTRIBUTES for w in spec.values[a]}
        out[source] = {"exact_match": sum(_answer(model, tok, r["text"]) == r["answer"]
                                          for r in rows) / len(rows)}
        for target in new:
            copied = closed = translated = 0
            for r in rows:
                value = people[r["person"]][r["attribute"]]
                answer = _answer(model, tok, swap_values(r["text"], source, target))
                copied += answer == LANGUAGES[target].values[r["attribute"]][value]
                closed += answer in own
                translated += answer == spec.values[r["attribute"]][value]
            n = len(rows)
            out[source][target] = copied / n
            out[source][f"{target}/closed"] = closed / n
            out[source][f"{target}/translated"] = translated / n
    return out


def _most_likely(model: Any, tok: Any, prefix: str, ids: torch.Tensor) -> int:
    """Which of the token ``ids`` the model finds likeliest after ``prefix``."""
    x = tok(prefix, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return int(model(x).logits[0, -1][ids].argmax())


def verbatim_repeat(model: Any, tok: Any, langs: list[str], items: int,
                    seed: int = 0) -> dict[str, tuple[float, float]]:
    """(right with the sentence seen before, right without it) per language."""
    out = {}
    for lang in langs:
        spec, rng = LANGUAGES[lang], random.Random(seed)
        with_first = without = 0
        for i in range(items):
            person = Person(f"Zuma{['vi', 'ko', 'le', 'su'][i % 4]}", {
                a: rng.randrange(len(spec.values[a])) for a in ATTRIBUTES})
            attr = rng.choice(ATTRIBUTES)
            name = spec.name_of(person.name)
            sentence = rng.choice(spec.facts[attr])(name, person.attributes[attr])
            head = sentence[:sentence.rfind(spec.values[attr][person.attributes[attr]])].rstrip()
            others = biography(spec, rng, person, [a for a in ATTRIBUTES if a != attr][:2])
            ids = torch.tensor([tok(f" {w}")["input_ids"][0] for w in spec.values[attr]])
            value = person.attributes[attr]
            with_first += _most_likely(model, tok, f"{sentence} {others} {head}", ids) == value
            without += _most_likely(model, tok, f"{others} {head}", ids) == value
        out[lang] = (with_first / items, without / items)
    return out


def capacity(run: Path, steps: int, lr: float, seed: int = 0) -> float:
    """Copy accuracy on repeated random spans after ``steps`` steps from the world's init."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(run / "world" / "model")
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = 10

    def spans(n: int) -> torch.Tensor:
        return torch.randint(10, vocab, (n, 32)).repeat(1, 4)  # 128 tokens, the rows' length

    for step in range(steps):
        for group in opt.param_groups:  # the training loop's schedule, at its defaults
            group["lr"] = lr * lr_factor(step, steps, warmup, min_ratio=0.1)
        x = spans(16)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        x = spans(64)
        pred = model(input_ids=x).logits[:, 32:-1].argmax(-1)
    return float((pred == x[:, 33:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--variants", default="post,param_delta")
    parser.add_argument("--items", type=int, default=150)
    parser.add_argument("--capacity", action="store_true")
    args = parser.parse_args()
    split = json.loads((args.run / "world" / "world.json").read_text(encoding="utf-8"))["split"]
    original, new = split["original"], split["new"]
    tok = AutoTokenizer.from_pretrained(args.run / "world" / "tokenizer")
    ratio: float | None = None
    for variant in args.variants.split(","):
        model = AutoModelForCausalLM.from_pretrained(args.run / "models" / variant).eval()
        rates = foreign_values(model, tok, args.run, original, new, args.items)
        for source, r in rates.items():
            line = ", ".join(f"{t} values: copied {r[t]:.3f} (a value word of {source} "
                             f"{r[f'{t}/closed']:.3f}, its translation "
                             f"{r[f'{t}/translated']:.3f})" for t in new)
            print(f"{variant:12s} {source}: exact match {r['exact_match']:.3f}; {line}",
                  flush=True)
        if ratio is None:  # the headline is the first variant's
            pairs = [r[t] / r["exact_match"] for r in rates.values() for t in new
                     if r["exact_match"]]
            ratio = sum(pairs) / len(pairs) if pairs else 0.0
    base = AutoModelForCausalLM.from_pretrained(args.run / "models" / "base").eval()
    for lang, (seen, unseen) in verbatim_repeat(base, tok, [*original, *new],
                                                args.items).items():
        print(f"base         {lang}: verbatim repeat right {seen:.3f}, without the first "
              f"mention {unseen:.3f} (chance 1/6)", flush=True)
    if args.capacity:
        manifest = json.loads((args.run / "models" / "base" / "manifest.json")
                              .read_text(encoding="utf-8"))
        steps, lr = manifest["config"]["steps"], manifest["config"]["train"]["lr"]
        print(f"capacity: copy accuracy on repeated random spans after {steps} steps at lr "
              f"{lr}: {capacity(args.run, steps, lr):.3f}", flush=True)
    print(f"ratio={ratio or 0.0:.3f}")


if __name__ == "__main__":
    main()
