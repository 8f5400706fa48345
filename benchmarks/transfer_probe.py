"""Does Δpost's instruction behaviour reach a new language at all? Scored below exact match.

    python benchmarks/transfer_probe.py RUN_DIR [--variants post,param_delta,deltamoe]
        [--items 150]

RUN_DIR is one seed's run folder of ``deltamoe reproduce`` (``<storage.root>/<run>-seed<N>``:
its ``world/`` and ``models/<variant>/``). For each open-book item, from the model's
next-token log-probabilities right after the assistant marker, over the value words of the
item's language (every answer word is one token in the world), it reports how often the most
likely value word is (a) of the asked attribute (chance 1/5), (b) one of the words in the
context (chance about 1/10), (c) the answer among the asked attribute's six words (chance
1/6). Exact match says only that no new-language answer is right; these say whether the
asked attribute, the copying, or nothing at all carries over.

The last line is ``ratio=<(a) on the new languages ÷ its chance>`` for the last variant
(ParamΔ by default): 1 means no transfer, 5 a perfect choice of attribute.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ATTRIBUTE_CHANCE = 1 / 5


def probe(run: Path, variant: str, langs: list[str], items: int) -> dict[str, dict[str, float]]:
    """The three rates of one variant on each language's first ``items`` open-book items."""
    values = json.loads((run / "world" / "world.json").read_text(encoding="utf-8"))["attributes"]
    tok = AutoTokenizer.from_pretrained(run / "world" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(run / "models" / variant).eval()
    out = {}
    for lang in langs:
        words = [(a, w) for a in values for w in values[a][lang]]  # attribute → language → words
        ids = torch.tensor([tok(f" {w}")["input_ids"][0] for _, w in words])
        rows = [json.loads(line) for line in (run / "world" / "eval" / lang / "openbook.jsonl")
                .read_text(encoding="utf-8").splitlines()][:items]
        asked = in_context = right = 0
        for row in rows:
            with torch.no_grad():
                logits = model(tok(row["text"], return_tensors="pt")["input_ids"]).logits[0, -1]
            scores = logits[ids]
            attr, word = words[int(scores.argmax())]
            context = row["messages"][0]["content"].split("\n")[0]  # the question follows it
            asked += attr == row["attribute"]
            in_context += word in re.findall(r"\w+", context)
            own = [i for i, (a, _) in enumerate(words) if a == row["attribute"]]
            right += words[own[int(scores[own].argmax())]][1] == row["answer"]
        n = len(rows)
        out[lang] = {"asked_attribute": asked / n, "in_context": in_context / n,
                     "right_of_six": right / n}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--variants", default="post,deltamoe,param_delta")
    parser.add_argument("--items", type=int, default=150)
    args = parser.parse_args()
    split = json.loads((args.run / "world" / "world.json").read_text(encoding="utf-8"))["split"]
    print(f"{'variant':12s} {'language':9s} asked attribute (1/5)  in context (~1/10)  "
          "right of six (1/6)")
    langs = [*split["original"], *split["new"]]
    new_rate = 0.0
    for variant in args.variants.split(","):
        rates = probe(args.run, variant, langs, args.items)
        for lang, r in rates.items():
            print(f"{variant:12s} {lang:9s} {r['asked_attribute']:20.3f} "
                  f"{r['in_context']:19.3f} {r['right_of_six']:19.3f}", flush=True)
        new_rate = sum(rates[lang]["asked_attribute"] for lang in split["new"]) / len(split["new"])
    print(f"ratio={new_rate / ATTRIBUTE_CHANCE:.3f}")


if __name__ == "__main__":
    main()
