"""Five small languages built from real lexicons and grammar: what the synthetic world speaks.

Each language realises the same facts (a person's city, job, favourite colour, pet, food) with
its own vocabulary, word order and morphology: English (SVO, analytic), German (verb-second,
gendered articles in the accusative), Swahili (noun-class agreement on verbs), Turkish (SOV,
suffixes with vowel harmony), Russian (Cyrillic, instrumental and accusative case endings).
Real words and function words matter: a real language-ID model must recognise the text, and a
real tokenizer must learn real subwords.

A value is an index into the attribute's value list; every language orders its words the same
way, so one fact has one meaning in every language. No answer word is written the same in two
languages (cities have local names), so a right answer in a new language cannot be an English
word copied through; every fact template holds the answer word in its dictionary form, so an
answer can be copied from a biography. Each attribute has three paraphrases (a model must learn
the fact, not one sentence) and two question forms (ten closed-book questions per person).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

ATTRIBUTES = ("city", "job", "color", "pet", "food")
NUM_VALUES = 6

_CYRILLIC = str.maketrans({
    "a": "а", "b": "б", "d": "д", "e": "е", "f": "ф", "g": "г", "i": "и", "k": "к", "l": "л",
    "m": "м", "n": "н", "o": "о", "p": "п", "r": "р", "s": "с", "t": "т", "u": "у", "v": "в",
    "z": "з", "A": "А", "B": "Б", "D": "Д", "E": "Е", "F": "Ф", "G": "Г", "I": "И", "K": "К",
    "L": "Л", "M": "М", "N": "Н", "O": "О", "P": "П", "R": "Р", "S": "С", "T": "Т", "U": "У",
    "V": "В", "Z": "З",
})

Template = Callable[[str, int], str]
Cloze = Callable[[str, int], tuple[str, str]]


@dataclass(frozen=True)
class LanguageSpec:
    """How one language says everything the world needs."""

    tag: str
    iso639_1: str
    name: str
    script: str
    values: dict[str, tuple[str, ...]]  # attribute → answer words (dictionary form)
    facts: dict[str, tuple[Template, ...]]  # attribute → paraphrases of "P has value v"
    questions: dict[str, tuple[Callable[[str], str], ...]]  # attribute → questions about P
    cloze: dict[str, Cloze]  # attribute → (prefix, continuation) with the value at the end
    filler: Callable[[random.Random], str]  # a generic sentence, for language beyond facts
    meeting: Callable[[str, str], str]  # "A met B": names in generic text, no facts

    def name_of(self, latin: str) -> str:
        """Names are language-neutral, written in this language's script."""
        return latin.translate(_CYRILLIC) if self.script == "Cyrl" else latin


def _pick(rng: random.Random, words: tuple[str, ...] | list[str]) -> str:
    return words[rng.randrange(len(words))]


# ----------------------------------------------------------------------------- English

_EN = {
    "city": ("Ashford", "Brookton", "Milhaven", "Redcliff", "Stonebury", "Westmere"),
    "job": ("teacher", "doctor", "farmer", "baker", "singer", "driver"),
    "color": ("red", "blue", "green", "yellow", "black", "white"),
    "pet": ("dog", "cat", "horse", "goat", "parrot", "rabbit"),
    "food": ("bread", "rice", "soup", "apples", "cheese", "honey"),
}


def _en_filler(rng: random.Random) -> str:
    subject = _pick(rng, ["The old man", "The young woman", "A small child", "My neighbour",
                          "The teacher", "Our friend"])
    verb = _pick(rng, ["walks to the market", "reads a book", "drinks tea with milk",
                       "works in the garden", "sings a song", "cooks dinner for the family"])
    when = _pick(rng, ["every morning", "in the evening", "after school", "on Sunday",
                       "when it rains", "with the children"])
    return f"{subject} {verb} {when}."



ENGLISH = LanguageSpec(
    tag="eng_Latn", iso639_1="en", name="English", script="Latn", values=_EN,
    facts={
        "city": (lambda p, v: f"{p} lives in {_EN['city'][v]}.",
                 lambda p, v: f"The home of {p} is in the town of {_EN['city'][v]}.",
                 lambda p, v: f"{p} was born and still lives in {_EN['city'][v]}."),
        "job": (lambda p, v: f"{p} works as a {_EN['job'][v]}.",
                lambda p, v: f"Everyone knows that {p} is a {_EN['job'][v]}.",
                lambda p, v: f"By trade {p} is a {_EN['job'][v]}."),
        "color": (lambda p, v: f"The favourite colour of {p} is {_EN['color'][v]}.",
                  lambda p, v: f"{p} likes the colour {_EN['color'][v]} more than any other.",
                  lambda p, v: f"{p} always wears something {_EN['color'][v]}."),
        "pet": (lambda p, v: f"{p} has a {_EN['pet'][v]}.",
                lambda p, v: f"At home {p} keeps a {_EN['pet'][v]}.",
                lambda p, v: f"The pet of {p} is a {_EN['pet'][v]}."),
        "food": (lambda p, v: f"{p} likes to eat {_EN['food'][v]}.",
                 lambda p, v: f"Every day {p} eats {_EN['food'][v]} for lunch.",
                 lambda p, v: f"The favourite food of {p} is {_EN['food'][v]}."),
    },
    questions={
        "city": (lambda p: f"Where does {p} live?", lambda p: f"In which town is the home of {p}?"),
        "job": (lambda p: f"What is the job of {p}?", lambda p: f"What does {p} work as?"),
        "color": (lambda p: f"What is the favourite colour of {p}?",
                  lambda p: f"Which colour does {p} like most?"),
        "pet": (lambda p: f"Which animal does {p} have?",
                lambda p: f"What pet does {p} keep at home?"),
        "food": (lambda p: f"What does {p} like to eat?",
                 lambda p: f"What is the favourite food of {p}?"),
    },
    cloze={
        "city": lambda p, v: (f"{p} lives in", f" {_EN['city'][v]}."),
        "job": lambda p, v: (f"{p} works as a", f" {_EN['job'][v]}."),
        "color": lambda p, v: (f"The favourite colour of {p} is", f" {_EN['color'][v]}."),
        "pet": lambda p, v: (f"{p} has a", f" {_EN['pet'][v]}."),
        "food": lambda p, v: (f"{p} likes to eat", f" {_EN['food'][v]}."),
    },
    filler=_en_filler,
    meeting=lambda a, b: f"{a} met {b} at the market.",
)

# ----------------------------------------------------------------------------- German

_DE = {
    "city": ("Bergfeld", "Tannhof", "Wiesbrunn", "Eichtal", "Mühlberg", "Sonnwald"),
    "job": ("Lehrer", "Arzt", "Bauer", "Bäcker", "Sänger", "Fahrer"),
    "color": ("rot", "blau", "grün", "gelb", "schwarz", "weiß"),
    "pet": ("Hund", "Katze", "Pferd", "Ziege", "Papagei", "Kaninchen"),
    "food": ("Brot", "Reis", "Suppe", "Äpfel", "Käse", "Honig"),
}
# Accusative indefinite article by gender: masculine einen, feminine eine, neuter ein.
_DE_PET_ACC = ("einen Hund", "eine Katze", "ein Pferd", "eine Ziege", "einen Papagei",
               "ein Kaninchen")
_DE_PET_NOM = ("ein Hund", "eine Katze", "ein Pferd", "eine Ziege", "ein Papagei",
               "ein Kaninchen")


def _de_filler(rng: random.Random) -> str:
    time = _pick(rng, ["Am Morgen", "Am Abend", "Nach der Schule", "Am Sonntag", "Im Sommer",
                       "Heute"])
    subject = _pick(rng, ["der alte Mann", "die junge Frau", "das kleine Kind",
                          "mein Nachbar", "unsere Lehrerin", "der Bruder"])
    rest = _pick(rng, ["geht zum Markt", "liest ein Buch", "trinkt Tee mit Milch",
                       "arbeitet im Garten", "singt ein Lied", "kocht das Essen für die Familie"])
    verb, _, obj = rest.partition(" ")
    return f"{time} {verb} {subject} {obj}."  # verb second: the time phrase comes first



GERMAN = LanguageSpec(
    tag="deu_Latn", iso639_1="de", name="German", script="Latn", values=_DE,
    facts={
        "city": (lambda p, v: f"{p} wohnt in {_DE['city'][v]}.",
                 lambda p, v: f"Das Haus von {p} steht in der Stadt {_DE['city'][v]}.",
                 lambda p, v: f"Seit vielen Jahren lebt {p} in {_DE['city'][v]}."),
        "job": (lambda p, v: f"{p} arbeitet als {_DE['job'][v]}.",
                lambda p, v: f"Jeder weiß, dass {p} als {_DE['job'][v]} arbeitet.",
                lambda p, v: f"Von Beruf ist {p} {_DE['job'][v]}."),
        "color": (lambda p, v: f"Die Lieblingsfarbe von {p} ist {_DE['color'][v]}.",
                  lambda p, v: f"Von allen Farben mag {p} die Farbe {_DE['color'][v]} am "
                               "liebsten.",
                  lambda p, v: f"{p} trägt am liebsten etwas in {_DE['color'][v]}."),
        "pet": (lambda p, v: f"{p} hat {_DE_PET_ACC[v]}.",
                lambda p, v: f"Zu Hause hat {p} {_DE_PET_ACC[v]}.",
                lambda p, v: f"Das Haustier von {p} ist {_DE_PET_NOM[v]}."),
        "food": (lambda p, v: f"{p} isst gern {_DE['food'][v]}.",
                 lambda p, v: f"Jeden Tag isst {p} {_DE['food'][v]} zum Mittagessen.",
                 lambda p, v: f"Das Lieblingsessen von {p} ist {_DE['food'][v]}."),
    },
    questions={
        "city": (lambda p: f"Wo wohnt {p}?", lambda p: f"In welcher Stadt steht das Haus von {p}?"),
        "job": (lambda p: f"Als was arbeitet {p}?", lambda p: f"Was ist der Beruf von {p}?"),
        "color": (lambda p: f"Was ist die Lieblingsfarbe von {p}?",
                  lambda p: f"Welche Farbe mag {p} am liebsten?"),
        "pet": (lambda p: f"Welches Tier hat {p}?",
                lambda p: f"Was ist das Haustier von {p}?"),
        "food": (lambda p: f"Was isst {p} gern?",
                 lambda p: f"Was ist das Lieblingsessen von {p}?"),
    },
    cloze={
        "city": lambda p, v: (f"{p} wohnt in", f" {_DE['city'][v]}."),
        "job": lambda p, v: (f"{p} arbeitet als", f" {_DE['job'][v]}."),
        "color": lambda p, v: (f"Die Lieblingsfarbe von {p} ist", f" {_DE['color'][v]}."),
        "pet": lambda p, v: (f"{p} hat", f" {_DE_PET_ACC[v]}."),
        "food": lambda p, v: (f"{p} isst gern", f" {_DE['food'][v]}."),
    },
    filler=_de_filler,
    meeting=lambda a, b: f"{a} traf {b} auf dem Markt.",
)

# ----------------------------------------------------------------------------- Swahili

_SW = {
    "city": ("Kisimani", "Mlimani", "Bondeni", "Pwanini", "Mtoni", "Ziwani"),
    "job": ("mwalimu", "daktari", "mkulima", "mwokaji", "mwimbaji", "dereva"),
    "color": ("nyekundu", "bluu", "kijani", "njano", "nyeusi", "nyeupe"),
    "pet": ("mbwa", "paka", "farasi", "mbuzi", "kasuku", "sungura"),
    "food": ("mkate", "wali", "supu", "matunda", "jibini", "asali"),
}


def _sw_filler(rng: random.Random) -> str:
    # Noun-class agreement: the verb prefix follows the subject's class (a- for class 1,
    # wa- for class 2, ki- for class 7).
    subject, prefix = _pick(rng, [("Mzee", "a"), ("Mwanamke kijana", "a"), ("Watoto", "wa"),
                                  ("Jirani yangu", "a"), ("Walimu wetu", "wa"),
                                  ("Kijana", "a")])
    tense = _pick(rng, ["na", "li", "ta"])
    verb = _pick(rng, ["kwenda sokoni", "soma kitabu", "kunywa chai na maziwa",
                       "fanya kazi shambani", "imba wimbo", "pika chakula cha jioni"])
    when = _pick(rng, ["kila asubuhi", "jioni", "baada ya shule", "siku ya Jumapili",
                       "mvua inaponyesha", "pamoja na familia"])
    return f"{subject} {prefix}{tense}{verb} {when}."  # monosyllabic stems keep ku-/kw-



SWAHILI = LanguageSpec(
    tag="swh_Latn", iso639_1="sw", name="Swahili", script="Latn", values=_SW,
    facts={
        "city": (lambda p, v: f"{p} anaishi {_SW['city'][v]}.",
                 lambda p, v: f"Nyumba ya {p} iko katika mji wa {_SW['city'][v]}.",
                 lambda p, v: f"{p} alizaliwa na bado anaishi {_SW['city'][v]}."),
        "job": (lambda p, v: f"{p} ni {_SW['job'][v]}.",
                lambda p, v: f"Kila mtu anajua kwamba {p} anafanya kazi ya {_SW['job'][v]}.",
                lambda p, v: f"Kazi ya {p} ni {_SW['job'][v]}."),
        "color": (lambda p, v: f"Rangi anayoipenda {p} ni {_SW['color'][v]}.",
                  lambda p, v: f"{p} anapenda rangi {_SW['color'][v]} kuliko rangi nyingine.",
                  lambda p, v: f"Mara nyingi {p} huvaa nguo za rangi {_SW['color'][v]}."),
        "pet": (lambda p, v: f"{p} ana {_SW['pet'][v]}.",
                lambda p, v: f"Nyumbani {p} anafuga {_SW['pet'][v]}.",
                lambda p, v: f"Mnyama wa nyumbani wa {p} ni {_SW['pet'][v]}."),
        "food": (lambda p, v: f"{p} anapenda kula {_SW['food'][v]}.",
                 lambda p, v: f"Kila siku {p} anakula {_SW['food'][v]} mchana.",
                 lambda p, v: f"Chakula anachokipenda {p} ni {_SW['food'][v]}."),
    },
    questions={
        "city": (lambda p: f"{p} anaishi wapi?", lambda p: f"Nyumba ya {p} iko katika mji gani?"),
        "job": (lambda p: f"{p} anafanya kazi gani?", lambda p: f"Kazi ya {p} ni ipi?"),
        "color": (lambda p: f"Rangi anayoipenda {p} ni ipi?",
                  lambda p: f"{p} anapenda rangi gani?"),
        "pet": (lambda p: f"{p} ana mnyama gani?",
                lambda p: f"Mnyama wa nyumbani wa {p} ni yupi?"),
        "food": (lambda p: f"{p} anapenda kula nini?",
                 lambda p: f"Chakula anachokipenda {p} ni kipi?"),
    },
    cloze={
        "city": lambda p, v: (f"{p} anaishi", f" {_SW['city'][v]}."),
        "job": lambda p, v: (f"{p} ni", f" {_SW['job'][v]}."),
        "color": lambda p, v: (f"Rangi anayoipenda {p} ni", f" {_SW['color'][v]}."),
        "pet": lambda p, v: (f"{p} ana", f" {_SW['pet'][v]}."),
        "food": lambda p, v: (f"{p} anapenda kula", f" {_SW['food'][v]}."),
    },
    filler=_sw_filler,
    meeting=lambda a, b: f"{a} alikutana na {b} sokoni.",
)

# ----------------------------------------------------------------------------- Turkish

_TR = {
    "city": ("Akçayır", "Yelbahçe", "Taşdere", "Sarıkum", "Gölbaşı", "Ilıcak"),
    "job": ("öğretmen", "doktor", "çiftçi", "fırıncı", "şarkıcı", "şoför"),
    "color": ("kırmızı", "mavi", "yeşil", "sarı", "siyah", "beyaz"),
    "pet": ("köpek", "kedi", "at", "keçi", "papağan", "tavşan"),
    "food": ("ekmek", "pilav", "çorba", "elma", "peynir", "bal"),
}
_BACK_VOWELS = set("aıou")
_FRONT_VOWELS = set("eiöü")
_VOICELESS = set("çfhkpsşt")


def _tr_locative(word: str) -> str:
    """-da/-de/-ta/-te by vowel harmony and consonant assimilation; an apostrophe after names."""
    last_vowel = next((c for c in reversed(word.lower()) if c in _BACK_VOWELS | _FRONT_VOWELS),
                      "a")
    vowel = "a" if last_vowel in _BACK_VOWELS else "e"
    consonant = "t" if word[-1].lower() in _VOICELESS else "d"
    apostrophe = "'" if word[:1].isupper() else ""
    return f"{word}{apostrophe}{consonant}{vowel}"


def _tr_filler(rng: random.Random) -> str:
    subject = _pick(rng, ["Yaşlı adam", "Genç kadın", "Küçük çocuk", "Komşum", "Öğretmenimiz",
                          "Arkadaşımız"])
    when = _pick(rng, ["her sabah", "akşamları", "okuldan sonra", "pazar günü",
                       "yağmur yağınca", "çocuklarla birlikte"])
    verb = _pick(rng, ["pazara gidiyor", "bir kitap okuyor", "sütlü çay içiyor",
                       "bahçede çalışıyor", "bir şarkı söylüyor", "aile için yemek pişiriyor"])
    return f"{subject} {when} {verb}."  # subject – adverbial – object – verb (SOV)



TURKISH = LanguageSpec(
    tag="tur_Latn", iso639_1="tr", name="Turkish", script="Latn", values=_TR,
    facts={
        "city": (lambda p, v: f"{p} {_tr_locative(_TR['city'][v])} yaşıyor.",
                 lambda p, v: f"{p} uzun yıllardır {_tr_locative(_TR['city'][v])} oturuyor.",
                 lambda p, v: f"{p} adlı kişinin şehri {_TR['city'][v]}."),
        "job": (lambda p, v: f"{p} {_TR['job'][v]} olarak çalışıyor.",
                lambda p, v: f"Herkes {p} adlı kişinin {_TR['job'][v]} olduğunu biliyor.",
                lambda p, v: f"{p} meslek olarak {_TR['job'][v]}."),
        "color": (lambda p, v: f"{p} en çok {_TR['color'][v]} rengini seviyor.",
                  lambda p, v: f"{p} için en güzel renk {_TR['color'][v]}.",
                  lambda p, v: f"{p} her zaman {_TR['color'][v]} bir şey giyiyor."),
        "pet": (lambda p, v: f"{p} bir {_TR['pet'][v]} besliyor.",
                lambda p, v: f"{p} evde bir {_TR['pet'][v]} bakıyor.",
                lambda p, v: f"{p} adlı kişinin evcil hayvanı bir {_TR['pet'][v]}."),
        "food": (lambda p, v: f"{p} {_TR['food'][v]} yemeyi seviyor.",
                 lambda p, v: f"{p} her gün öğlen {_TR['food'][v]} yiyor.",
                 lambda p, v: f"{p} için en güzel yemek {_TR['food'][v]}."),
    },
    questions={
        "city": (lambda p: f"{p} nerede yaşıyor?", lambda p: f"{p} hangi şehirde oturuyor?"),
        "job": (lambda p: f"{p} ne iş yapıyor?", lambda p: f"{p} adlı kişinin mesleği ne?"),
        "color": (lambda p: f"{p} en çok hangi rengi seviyor?",
                  lambda p: f"{p} için en güzel renk hangisi?"),
        "pet": (lambda p: f"{p} hangi hayvanı besliyor?",
                lambda p: f"{p} adlı kişinin evcil hayvanı ne?"),
        "food": (lambda p: f"{p} ne yemeyi seviyor?", lambda p: f"{p} her gün öğlen ne yiyor?"),
    },
    cloze={
        # Turkish puts the verb last, so the cloze asks for "value + verb".
        "city": lambda p, v: (f"{p}", f" {_tr_locative(_TR['city'][v])} yaşıyor."),
        "job": lambda p, v: (f"{p}", f" {_TR['job'][v]} olarak çalışıyor."),
        "color": lambda p, v: (f"{p} için en güzel renk", f" {_TR['color'][v]}."),
        "pet": lambda p, v: (f"{p} bir", f" {_TR['pet'][v]} besliyor."),
        "food": lambda p, v: (f"{p}", f" {_TR['food'][v]} yemeyi seviyor."),
    },
    filler=_tr_filler,
    meeting=lambda a, b: f"{a} pazarda {b} ile karşılaştı.",
)

# ----------------------------------------------------------------------------- Russian

_RU = {
    "city": ("Берёзовка", "Заречье", "Сосновка", "Озёрск", "Каменка", "Луговое"),
    "job": ("учитель", "врач", "фермер", "пекарь", "певец", "водитель"),
    "color": ("красный", "синий", "зелёный", "жёлтый", "чёрный", "белый"),
    "pet": ("собака", "кошка", "лошадь", "коза", "попугай", "кролик"),
    "food": ("хлеб", "рис", "суп", "яблоки", "сыр", "мёд"),
}
# Every template keeps the answer in the nominative (the foods' accusative is the same word),
# so the answer word of a biography is the word a question expects.


def _ru_filler(rng: random.Random) -> str:
    subject = _pick(rng, ["Старый мужчина", "Молодая женщина", "Маленький ребёнок",
                          "Мой сосед", "Наша учительница", "Наш друг"])
    verb = _pick(rng, ["идёт на рынок", "читает книгу", "пьёт чай с молоком",
                       "работает в саду", "поёт песню", "готовит ужин для семьи"])
    when = _pick(rng, ["каждое утро", "вечером", "после школы", "в воскресенье",
                       "когда идёт дождь", "вместе с детьми"])
    return f"{subject} {verb} {when}."



RUSSIAN = LanguageSpec(
    tag="rus_Cyrl", iso639_1="ru", name="Russian", script="Cyrl", values=_RU,
    facts={
        "city": (lambda p, v: f"{p} живёт в городе {_RU['city'][v]}.",
                 lambda p, v: f"Дом, где живёт {p}, находится в городе {_RU['city'][v]}.",
                 lambda p, v: f"Родной город, где до сих пор живёт {p}, — {_RU['city'][v]}."),
        "job": (lambda p, v: f"{p} по профессии {_RU['job'][v]}.",
                lambda p, v: f"Все знают, что {p} — {_RU['job'][v]}.",
                lambda p, v: f"Профессия у {p} — {_RU['job'][v]}."),
        "color": (lambda p, v: f"Любимый цвет у {p} — {_RU['color'][v]}.",
                  lambda p, v: f"Больше всего {p} нравится {_RU['color'][v]} цвет.",
                  lambda p, v: f"Из всех цветов {p} выбирает {_RU['color'][v]}."),
        "pet": (lambda p, v: f"У {p} есть {_RU['pet'][v]}.",
                lambda p, v: f"Дома у {p} живёт {_RU['pet'][v]}.",
                lambda p, v: f"Домашнее животное у {p} — {_RU['pet'][v]}."),
        "food": (lambda p, v: f"{p} любит есть {_RU['food'][v]}.",
                 lambda p, v: f"Каждый день на обед {p} ест {_RU['food'][v]}.",
                 lambda p, v: f"Любимая еда у {p} — {_RU['food'][v]}."),
    },
    questions={
        "city": (lambda p: f"Где живёт {p}?", lambda p: f"В каком городе живёт {p}?"),
        "job": (lambda p: f"Кто {p} по профессии?", lambda p: f"Какая профессия у {p}?"),
        "color": (lambda p: f"Какой любимый цвет у {p}?",
                  lambda p: f"Какой цвет больше всего нравится {p}?"),
        "pet": (lambda p: f"Какое животное есть у {p}?", lambda p: f"Кто живёт дома у {p}?"),
        "food": (lambda p: f"Что любит есть {p}?", lambda p: f"Какая любимая еда у {p}?"),
    },
    cloze={
        "city": lambda p, v: (f"{p} живёт в городе", f" {_RU['city'][v]}."),
        "job": lambda p, v: (f"{p} по профессии", f" {_RU['job'][v]}."),
        "color": lambda p, v: (f"Любимый цвет у {p} —", f" {_RU['color'][v]}."),
        "pet": lambda p, v: (f"У {p} есть", f" {_RU['pet'][v]}."),
        "food": lambda p, v: (f"{p} любит есть", f" {_RU['food'][v]}."),
    },
    filler=_ru_filler,
    meeting=lambda a, b: f"{a} встретил {b} на рынке.",
)

LANGUAGES: dict[str, LanguageSpec] = {
    spec.tag: spec for spec in (ENGLISH, GERMAN, SWAHILI, TURKISH, RUSSIAN)
}
"""Every language of the world, by canonical tag, in a fixed order."""
