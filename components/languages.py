"""Canonical language tags and their mappings to the codes each dataset and benchmark uses.

The canonical tag is ``<iso639-3>_<Script>`` (``swh_Latn``, ``zho_Hans``), as FineWeb2, GlotLID,
Belebele and FLORES-200 write it: web corpora are split by language *and* script, and a run's data,
experts and results are keyed by it. Other sources speak ISO 639-1 (CulturaX, XCOPA, XNLI, MGSM,
Global-MMLU write ``sw``), which names a macrolanguage where the tag names an individual language:
``sw`` is the macrolanguage Swahili (``swa``), FineWeb2 and Belebele use individual Swahili
``swh``. :data:`_INDIVIDUAL_TO_ISO1` records those pairs, :data:`_ISO1_DEFAULT` the tag chosen when
an ISO 639-1 code has several (a script, or a macrolanguage member).

Known tags are the 122 Belebele/FLORES tags, the CulturaX languages and the benchmark languages.
Any other tag whose code is a real ISO 639-3 code and whose script is a real ISO 15924 code is
accepted too (FineWeb2 has ~1,800 language-script pairs), with names from ``pycountry``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType

import pycountry

__all__ = [
    "Language",
    "UnknownLanguageError",
    "belebele_tags",
    "benchmark_names",
    "canonical_tag",
    "culturax_code",
    "culturax_codes",
    "culturax_tag",
    "fineweb2_tag",
    "from_iso639_1",
    "get_language",
    "known_tags",
    "languages_with_task",
    "tasks_for",
    "to_iso639_1",
]


class UnknownLanguageError(ValueError):
    """A code that names no language; the message lists the closest known tags."""


# Belebele (= the FLORES-200 tags it was built from), as lm-eval 0.4.13 names its tasks.
_BELEBELE = """
acm_Arab afr_Latn als_Latn amh_Ethi apc_Arab arb_Arab arb_Latn ars_Arab ary_Arab arz_Arab
asm_Beng azj_Latn bam_Latn ben_Beng ben_Latn bod_Tibt bul_Cyrl cat_Latn ceb_Latn ces_Latn
ckb_Arab dan_Latn deu_Latn ell_Grek eng_Latn est_Latn eus_Latn fin_Latn fra_Latn fuv_Latn
gaz_Latn grn_Latn guj_Gujr hat_Latn hau_Latn heb_Hebr hin_Deva hin_Latn hrv_Latn hun_Latn
hye_Armn ibo_Latn ilo_Latn ind_Latn isl_Latn ita_Latn jav_Latn jpn_Jpan kac_Latn kan_Knda
kat_Geor kaz_Cyrl kea_Latn khk_Cyrl khm_Khmr kin_Latn kir_Cyrl kor_Hang lao_Laoo lin_Latn
lit_Latn lug_Latn luo_Latn lvs_Latn mal_Mlym mar_Deva mkd_Cyrl mlt_Latn mri_Latn mya_Mymr
nld_Latn nob_Latn npi_Deva npi_Latn nso_Latn nya_Latn ory_Orya pan_Guru pbt_Arab pes_Arab
plt_Latn pol_Latn por_Latn ron_Latn rus_Cyrl shn_Mymr sin_Latn sin_Sinh slk_Latn slv_Latn
sna_Latn snd_Arab som_Latn sot_Latn spa_Latn srp_Cyrl ssw_Latn sun_Latn swe_Latn swh_Latn
tam_Taml tel_Telu tgk_Cyrl tgl_Latn tha_Thai tir_Ethi tsn_Latn tso_Latn tur_Latn ukr_Cyrl
urd_Arab urd_Latn uzn_Latn vie_Latn war_Latn wol_Latn xho_Latn yor_Latn zho_Hans zho_Hant
zsm_Latn zul_Latn
""".split()

# CulturaX configurations (directory names): ISO 639-1 where one exists, else ISO 639-3.
_CULTURAX = """
af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb
cs cv cy da de dsb dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hr hsb
ht hu hy ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc
lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os
pa pam pl pms pnb ps pt qu rm ro ru rue sa sah scn sd sh si sk sl so sq sr su sv sw ta te tg th
tk tl tr tt tyv ug uk ur uz vec vi vls vo wa war wuu xal xmf yi yo yue zh
""".split()

# Individual language (what the tag names) → the ISO 639-1 code of its macrolanguage.
_INDIVIDUAL_TO_ISO1 = {
    "swh": "sw", "arb": "ar", "pes": "fa", "zsm": "ms", "lvs": "lv", "khk": "mn",
    "plt": "mg", "npi": "ne", "ory": "or", "gaz": "om", "uzn": "uz", "azj": "az",
    "als": "sq", "pbt": "ps", "cmn": "zh", "ekk": "et", "kmr": "ku", "ydd": "yi",
    "quy": "qu", "gug": "gn", "pnb": "pa", "lug": "lg", "nob": "no",
}

# ISO 639-1 (or a CulturaX 639-3 name) → the default canonical tag.
_ISO1_DEFAULT = {
    "sw": "swh_Latn", "ar": "arb_Arab", "fa": "pes_Arab", "zh": "zho_Hans", "ms": "zsm_Latn",
    "et": "est_Latn", "lv": "lvs_Latn", "mn": "khk_Cyrl", "mg": "plt_Latn", "ne": "npi_Deva",
    "or": "ory_Orya", "om": "gaz_Latn", "uz": "uzn_Latn", "az": "azj_Latn", "sq": "als_Latn",
    "ps": "pbt_Arab", "hi": "hin_Deva", "ur": "urd_Arab", "bn": "ben_Beng", "si": "sin_Sinh",
    "sr": "srp_Cyrl", "ku": "kmr_Latn", "no": "nob_Latn", "yi": "ydd_Hebr", "qu": "quy_Latn",
    "gn": "grn_Latn", "pa": "pan_Guru", "sh": "hbs_Latn", "ja": "jpn_Jpan", "ko": "kor_Hang",
    "ckb": "ckb_Arab", "azb": "azb_Arab", "arz": "arz_Arab", "pnb": "pnb_Arab",
    "mzn": "mzn_Arab", "lrc": "lrc_Arab", "bpy": "bpy_Beng", "new": "new_Deva",
    "mai": "mai_Deva", "bh": "bho_Deva", "gom": "gom_Deva", "xmf": "xmf_Geor", "yue": "yue_Hant",
    "wuu": "wuu_Hans", "dv": "div_Thaa", "bo": "bod_Tibt", "am": "amh_Ethi", "he": "heb_Hebr",
    "el": "ell_Grek", "hy": "hye_Armn", "ka": "kat_Geor", "km": "khm_Khmr", "lo": "lao_Laoo",
    "my": "mya_Mymr", "th": "tha_Thai", "ta": "tam_Taml", "te": "tel_Telu", "kn": "kan_Knda",
    "ml": "mal_Mlym", "gu": "guj_Gujr", "mr": "mar_Deva", "sa": "san_Deva", "as": "asm_Beng",
    "ug": "uig_Arab", "sd": "snd_Arab", "nah": "nhe_Latn",
}

# CulturaX directory names that are not what ISO 639 says: it follows Wikipedia's codes.
_CULTURAX_TAG = {
    "als": "gsw_Latn",  # Wikipedia's "als" is Alemannic, ISO's als is Tosk Albanian
    "eml": "egl_Latn",  # ISO retired eml (split into egl and rgn)
}

# Scripts of languages outside Belebele whose main script is not Latin.
_SCRIPT = {
    "bel": "Cyrl", "tgk": "Cyrl", "kir": "Cyrl", "mon": "Cyrl", "srp": "Cyrl", "mkd": "Cyrl",
    "yid": "Hebr", "heb": "Hebr", "uig": "Arab", "snd": "Arab", "kur": "Latn", "ckb": "Arab",
    "bak": "Cyrl", "che": "Cyrl", "chv": "Cyrl", "ava": "Cyrl", "bxr": "Cyrl",
    "kbd": "Cyrl", "krc": "Cyrl", "kom": "Cyrl", "lez": "Cyrl", "mhr": "Cyrl", "mrj": "Cyrl",
    "myv": "Cyrl", "oss": "Cyrl", "rue": "Cyrl", "sah": "Cyrl", "tat": "Cyrl", "tyv": "Cyrl",
    "xal": "Cyrl", "tuk": "Latn", "fas": "Arab", "urd": "Arab", "pus": "Arab",
    "cmn": "Hani",  # FineWeb2 and GlotLID write Mandarin cmn_Hani
}

# Canonical tags whose FineWeb2 folder is another tag: FineWeb2 files Mandarin in both scripts
# under ``cmn_Hani`` (and no ``zho_*`` folder exists), which ``zh``/``zho`` resolve to.
_FINEWEB2_TAG = {"zho_Hans": "cmn_Hani", "zho_Hant": "cmn_Hani"}

# Benchmark → the languages (ISO 639-1, as lm-eval names them) and the task-name pattern.
_BENCHMARKS: dict[str, tuple[str, str]] = {
    "xcopa": ("xcopa_{}", "et ht id it qu sw ta th tr vi zh"),
    "xnli": ("xnli_{}", "ar bg de el en es fr hi ru sw th tr ur vi zh"),
    "mgsm": ("mgsm_direct_{}", "bn de en es fr ja ru sw te th zh"),
    "global_mmlu": ("global_mmlu_full_{}",
                    "am ar bn cs de el en es fa fil fr ha he hi id ig it ja ko ky lt mg ms ne "
                    "nl ny pl pt ro ru si sn so sr sv sw te tr uk vi yo zh"),
    "global_mmlu_lite": ("global_mmlu_{}", "ar bn de en es fr hi id it ja ko pt sw yo zh"),
    "xstorycloze": ("xstorycloze_{}", "ar en es eu hi id my ru sw te zh"),
    "xwinograd": ("xwinograd_{}", "en fr jp pt ru zh"),
    "pawsx": ("paws_{}", "de en es fr ja ko zh"),
    "lambada_multilingual": ("lambada_openai_mt_{}", "de en es fr it"),
    "arc_multilingual": ("arc_{}", "ar bn ca da de es eu fr gu hi hr hu hy id it kn ml mr ne "
                                   "nl pt ro ru sk sr sv ta te uk vi zh"),
    "hellaswag_multilingual": ("hellaswag_{}", "ar bn ca da de es eu fr gu hi hr hu hy id it "
                                               "kn ml mr ne nl pt ro ru sk sr sv ta te uk vi"),
    "mmlu_multilingual": ("m_mmlu_{}", "ar bn ca da de en es eu fr gu hi hr hu hy id is it kn "
                                       "ml mr nb ne nl pt ro ru sk sr sv ta te uk vi zh"),
}
# lm-eval's own spellings that are not ISO 639-1.
_BENCHMARK_CODE_ALIASES = {"jp": "ja", "fil": "tl", "nb": "no"}

_TAG_PATTERN = re.compile(r"^([a-z]{3})[_-]([A-Z][a-z]{3})$")


@dataclass(frozen=True)
class Language:
    """One language-script pair and the names other datasets give it."""

    tag: str
    name: str
    iso639_3: str
    script: str
    iso639_1: str | None = None
    tasks: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def _iso1_of(code3: str) -> str | None:
    if code3 in _INDIVIDUAL_TO_ISO1:
        return _INDIVIDUAL_TO_ISO1[code3]
    entry = pycountry.languages.get(alpha_3=code3)
    return getattr(entry, "alpha_2", None) if entry is not None else None


def _name_of(code3: str) -> str:
    entry = pycountry.languages.get(alpha_3=code3)
    return entry.name if entry is not None else code3


def _tag_for_code(code: str) -> str:
    """Default tag for an ISO 639-1 code or a CulturaX 639-3 directory name."""
    if code in _ISO1_DEFAULT:
        return _ISO1_DEFAULT[code]
    entry = pycountry.languages.get(alpha_2=code) if len(code) == 2 else \
        pycountry.languages.get(alpha_3=code)
    if entry is None:
        raise UnknownLanguageError(f"no ISO 639 code {code!r}")
    code3 = entry.alpha_3
    in_belebele = [t for t in _BELEBELE if t.startswith(f"{code3}_")]
    return in_belebele[0] if in_belebele else f"{code3}_{_SCRIPT.get(code3, 'Latn')}"


@cache
def _table() -> dict[str, Language]:
    tags: dict[str, None] = dict.fromkeys(_BELEBELE)
    for code in _CULTURAX:
        tags.setdefault(culturax_tag(code))
    tasks: dict[str, dict[str, str]] = {}
    for bench, (pattern, codes) in _BENCHMARKS.items():
        for code in codes.split():
            tag = _tag_for_code(_BENCHMARK_CODE_ALIASES.get(code, code))
            tags.setdefault(tag)
            tasks.setdefault(tag, {})[bench] = pattern.format(code)
    for tag in _BELEBELE:
        tasks.setdefault(tag, {})["belebele"] = f"belebele_{tag}"
    table = {}
    for tag in tags:
        code3, script = tag.split("_")
        table[tag] = Language(tag=tag, name=_name_of(code3), iso639_3=code3, script=script,
                              iso639_1=_iso1_of(code3),
                              tasks=MappingProxyType(dict(sorted(tasks.get(tag, {}).items()))))
    return table


@cache
def _iso1_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for lang in _table().values():
        if lang.iso639_1:
            index.setdefault(lang.iso639_1, lang.tag)
    index.update({k: v for k, v in _ISO1_DEFAULT.items() if len(k) == 2})
    return index


@cache
def _name_index() -> dict[str, str]:
    """English names → tag; macrolanguage names (``swahili``) reach the default member."""
    index: dict[str, str] = {}
    for lang in _table().values():
        index.setdefault(re.sub(r"\s*\(.*\)$", "", lang.name).lower(), lang.tag)
    for iso1, tag in _iso1_index().items():
        entry = pycountry.languages.get(alpha_2=iso1)
        if entry is not None:
            index[re.sub(r"\s*\(.*\)$", "", entry.name).lower()] = tag
    return index


def _suggest(code: str) -> str:
    query = code.strip()
    pool = list(_table()) + list(_iso1_index()) + list(_name_index())
    matches = difflib.get_close_matches(query, pool, n=6, cutoff=0.5)
    matches += difflib.get_close_matches(query.lower(), pool, n=6, cutoff=0.5)
    tags = []
    for match in matches:
        tag = match if match in _table() else _iso1_index().get(match) or \
            _name_index().get(match)
        if tag and tag not in tags:
            tags.append(tag)
    return ", ".join(tags[:5]) if tags else "none"


def canonical_tag(code: str) -> str:
    """Normalise any accepted spelling to the canonical tag, or raise with suggestions.

    Accepted: a canonical tag in any case (``SWH_latn``), a BCP-47 style ``swh-Latn``, an ISO
    639-1 code (``sw``), a CulturaX directory name (``als``), a 639-1 code with a script
    (``sr_Latn``), a bare ISO 639-3 code with a default script (``swh``), an English name
    (``Swahili``), and any real ISO 639-3 code with a real ISO 15924 script.
    """
    if not isinstance(code, str) or not code.strip():
        raise UnknownLanguageError(f"empty language code {code!r}")
    raw = code.strip()
    parts = re.split(r"[_-]", raw)
    if len(parts) == 2 and re.fullmatch(r"[A-Za-z]{2}|\d{3}", parts[1]):
        parts = parts[:1]  # a BCP-47 region (en-US, es-419) does not change the language
    if len(parts) == 2 and len(parts[1]) == 4:
        head, script = parts[0].lower(), parts[1].title()
        if len(head) == 2 and head in _iso1_index():
            head = _iso1_index()[head].split("_")[0]
        tag = f"{head}_{script}"
        if tag in _table():
            return tag
        if _TAG_PATTERN.match(tag) and pycountry.languages.get(alpha_3=head) is not None \
                and pycountry.scripts.get(alpha_4=script) is not None:
            return tag
    lower = raw.lower()
    if lower in _iso1_index():
        return _iso1_index()[lower]
    if len(parts) == 1 and parts[0].lower() in _iso1_index():
        return _iso1_index()[parts[0].lower()]
    if lower in _name_index():
        return _name_index()[lower]
    if len(lower) == 3 and lower.isalpha():
        scripts = sorted(t for t in _table() if t.startswith(f"{lower}_"))
        if scripts:
            default = _ISO1_DEFAULT.get(_iso1_of(lower) or "")
            return default if default in scripts else scripts[0]
        if pycountry.languages.get(alpha_3=lower) is not None:
            return f"{lower}_{_SCRIPT.get(lower, 'Latn')}"
    raise UnknownLanguageError(
        f"unknown language tag {raw!r}: expected iso639-3_Script such as 'swh_Latn' "
        f"(or an ISO 639-1 code such as 'sw'); closest known: {_suggest(raw)}")


def get_language(code: str) -> Language:
    """The :class:`Language` for any accepted spelling of a code."""
    tag = canonical_tag(code)
    known = _table().get(tag)
    if known is not None:
        return known
    code3, script = tag.split("_")
    return Language(tag=tag, name=_name_of(code3), iso639_3=code3, script=script,
                    iso639_1=_iso1_of(code3))


def to_iso639_1(tag: str) -> str | None:
    """ISO 639-1 code of a tag's language (its macrolanguage's, for individual languages)."""
    return get_language(tag).iso639_1


def from_iso639_1(code: str) -> str:
    """The default canonical tag for an ISO 639-1 code (``sw`` → ``swh_Latn``)."""
    index = _iso1_index()
    if code.lower() not in index:
        raise UnknownLanguageError(f"unknown ISO 639-1 code {code!r}; closest known: "
                                   f"{_suggest(code)}")
    return index[code.lower()]


def tasks_for(tag: str) -> dict[str, str]:
    """Benchmark → lm-eval task name, for the benchmarks that exist in this language."""
    return dict(get_language(tag).tasks)


def languages_with_task(benchmark: str) -> list[str]:
    """Tags that have a task of ``benchmark`` (``belebele``, ``xnli``, ``mgsm``, ...)."""
    found = [t for t, lang in _table().items() if benchmark in lang.tasks]
    if not found:
        raise KeyError(f"unknown benchmark {benchmark!r}; known: "
                       f"{', '.join(benchmark_names())}")
    return found


def benchmark_names() -> list[str]:
    """Every benchmark whose per-language task names this module knows (Belebele first)."""
    return ["belebele", *_BENCHMARKS]


def known_tags() -> list[str]:
    return list(_table())


def belebele_tags() -> list[str]:
    return list(_BELEBELE)


def culturax_codes() -> list[str]:
    """CulturaX directory names, as the dataset spells them."""
    return list(_CULTURAX)


def culturax_tag(code: str) -> str:
    """The canonical tag of a CulturaX directory (``sw`` → ``swh_Latn``, ``als`` → ``gsw_Latn``)."""
    if code not in _CULTURAX:
        raise UnknownLanguageError(f"{code!r} is not a CulturaX configuration; closest: "
                                   f"{', '.join(difflib.get_close_matches(code, _CULTURAX))}")
    return _CULTURAX_TAG.get(code) or _tag_for_code(code)


@cache
def _culturax_by_tag() -> dict[str, str]:
    return {culturax_tag(code): code for code in _CULTURAX}


def culturax_code(tag: str) -> str:
    """The CulturaX directory holding a tag's language (``swh_Latn`` → ``sw``)."""
    tag = canonical_tag(tag)
    if tag in _culturax_by_tag():
        return _culturax_by_tag()[tag]
    iso1 = to_iso639_1(tag)
    if iso1 in _CULTURAX:
        return iso1
    raise UnknownLanguageError(f"{tag} has no CulturaX configuration")


def fineweb2_tag(tag: str) -> str:
    """The FineWeb2 folder (``data/<tag>/train``) holding a canonical tag's language: the tag
    itself except where FineWeb2 files it under another (``zho_Hans`` → ``cmn_Hani``)."""
    tag = canonical_tag(tag)
    return _FINEWEB2_TAG.get(tag, tag)
