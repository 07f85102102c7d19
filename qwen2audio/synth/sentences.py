"""Sentences to speak: an English generator (tens of thousands of distinct sentences from a small
vocabulary a small model can learn) and fixed banks of everyday sentences in six more languages.

Numbers are written as words: the text is both what the engine reads and the transcript, and a
digit would be read aloud as a word the transcript does not contain.
"""

from __future__ import annotations

import numpy as np

from .split import is_heldout

LANGUAGE_NAMES = {"en": "English", "de": "German", "es": "Spanish", "fr": "French", "it": "Italian",
                  "ru": "Russian", "zh": "Chinese"}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
TENS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy", 80: "eighty",
        90: "ninety"}


def number_words(n: int) -> str:
    """0..999 in English words: 42 -> 'forty-two', 300 -> 'three hundred'."""
    if not 0 <= n <= 999:
        raise ValueError(f"number out of range: {n}")
    if n <= 20:
        return NUMBER_WORDS[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens * 10] + (f"-{NUMBER_WORDS[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{NUMBER_WORDS[hundreds]} hundred" + (f" and {number_words(rest)}" if rest else "")


SUBJECTS = ["the old man", "my sister", "a small dog", "the teacher", "our neighbour", "the little girl",
            "my brother", "the doctor", "a young woman", "the farmer", "the children", "my friend",
            "the pilot", "a tall boy", "the baker", "her father", "his mother", "the driver", "a quiet student",
            "the singer", "my uncle", "the nurse", "a tired worker", "the captain"]
VERBS = ["opens", "paints", "reads", "finds", "carries", "cleans", "buys", "sells", "draws", "fixes",
         "washes", "holds", "brings", "likes", "watches", "moves", "checks", "forgets", "shows", "wants"]
PLURAL_VERBS = {"the children": True}  # subjects that take the plural verb form
OBJECTS = ["a red door", "the green box", "an old book", "the blue car", "a warm coat", "the white cup",
           "a long letter", "the broken chair", "two apples", "three small boats", "the kitchen window",
           "a yellow kite", "the new map", "a heavy bag", "the wooden table", "five black pens",
           "a bright lamp", "the little clock", "an empty bottle", "the garden gate"]
PLACES = ["in the garden", "at the station", "near the river", "in the kitchen", "on the bus", "at school",
          "by the window", "in the park", "at the market", "on the beach", "in the office", "upstairs"]
TIMES = ["every morning", "on Sunday", "after lunch", "before dinner", "today", "at night", "on Monday",
         "in the evening", "this week", "again"]
ADJECTIVES = ["red", "green", "blue", "small", "big", "old", "new", "round", "yellow", "white"]
NOUNS = ["cups", "books", "apples", "chairs", "boxes", "birds", "pencils", "shoes", "plates", "stones"]
WEATHER = ["cold", "warm", "sunny", "rainy", "windy", "cloudy", "foggy", "hot"]
WEATHER_PLACES = ["in the city", "by the sea", "in the mountains", "outside", "here", "in the north"]


def _plural(verb: str) -> str:
    for suffix, repl in (("ches", "ch"), ("shes", "sh"), ("xes", "x"), ("sses", "ss"), ("s", "")):
        if verb.endswith(suffix):
            return verb[: -len(suffix)] + repl
    return verb


def _sentence(words: str) -> str:
    return words[0].upper() + words[1:] + "."


def english_sentence(rng: np.random.Generator) -> str:
    kind = rng.random()
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if kind < 0.7:
        subject, verb = pick(SUBJECTS), pick(VERBS)
        if subject in PLURAL_VERBS:
            verb = _plural(verb)
        tail = [x for x in (pick(PLACES) if rng.random() < 0.7 else "", pick(TIMES) if rng.random() < 0.5 else "") if x]
        return _sentence(" ".join([subject, verb, pick(OBJECTS), *tail]))
    if kind < 0.85:
        n = int(rng.integers(2, 21))
        return _sentence(f"there are {number_words(n)} {pick(ADJECTIVES)} {pick(NOUNS)} on the table")
    return _sentence(f"it is {pick(WEATHER)} and {pick(WEATHER)} {pick(WEATHER_PLACES)} {pick(TIMES)}")


# Everyday sentences, written for this corpus. Chinese is read by espeak-ng's Mandarin voice.
BANKS = {
    "de": ["Guten Morgen, wie geht es dir?", "Ich trinke jeden Tag einen Kaffee.", "Das Wetter ist heute schön.",
           "Wir fahren morgen mit dem Zug nach Berlin.", "Meine Schwester liest ein dickes Buch.",
           "Der Hund schläft im Garten.", "Kannst du mir bitte helfen?", "Das Essen ist sehr lecker.",
           "Wo ist der Bahnhof?", "Ich habe heute keine Zeit.", "Die Kinder spielen im Park.",
           "Er kauft frisches Brot beim Bäcker.", "Am Wochenende besuchen wir unsere Großeltern.",
           "Das Fenster ist offen.", "Sie arbeitet in einem großen Büro.", "Es regnet schon den ganzen Tag.",
           "Ich lerne jeden Abend Englisch.", "Der Lehrer schreibt an die Tafel.", "Wie spät ist es jetzt?",
           "Wir essen um sieben Uhr zu Abend."],
    "es": ["Buenos días, ¿cómo estás?", "Me gusta mucho el café con leche.", "Hoy hace mucho calor.",
           "Mañana vamos a la playa.", "Mi hermano trabaja en un hospital.", "El perro duerme en el jardín.",
           "¿Puedes ayudarme, por favor?", "La comida está muy rica.", "¿Dónde está la estación?",
           "No tengo tiempo hoy.", "Los niños juegan en el parque.", "Ella compra pan en la panadería.",
           "El fin de semana visitamos a mis abuelos.", "La ventana está abierta.", "Estudio inglés todas las noches.",
           "Está lloviendo desde la mañana.", "El profesor escribe en la pizarra.", "¿Qué hora es?",
           "Cenamos a las ocho.", "Mi casa tiene un jardín pequeño."],
    "fr": ["Bonjour, comment ça va?", "Je bois un café tous les matins.", "Il fait beau aujourd'hui.",
           "Nous prenons le train demain.", "Ma sœur lit un long livre.", "Le chien dort dans le jardin.",
           "Peux-tu m'aider, s'il te plaît?", "Le repas est délicieux.", "Où est la gare?",
           "Je n'ai pas le temps aujourd'hui.", "Les enfants jouent dans le parc.",
           "Il achète du pain à la boulangerie.",
           "Le week-end, nous rendons visite à nos grands-parents.", "La fenêtre est ouverte.",
           "Elle travaille dans un grand bureau.", "Il pleut depuis ce matin.", "J'apprends l'anglais chaque soir.",
           "Le professeur écrit au tableau.", "Quelle heure est-il?", "Nous dînons à huit heures."],
    "it": ["Buongiorno, come stai?", "Bevo un caffè ogni mattina.", "Oggi fa bel tempo.",
           "Domani andiamo al mare.", "Mio fratello lavora in ospedale.", "Il cane dorme in giardino.",
           "Mi puoi aiutare, per favore?", "Il pranzo è molto buono.", "Dov'è la stazione?",
           "Oggi non ho tempo.", "I bambini giocano nel parco.", "Lei compra il pane dal fornaio.",
           "Nel fine settimana visitiamo i nonni.", "La finestra è aperta.", "Studio inglese ogni sera.",
           "Piove da stamattina.", "L'insegnante scrive alla lavagna.", "Che ore sono?",
           "Ceniamo alle otto.", "La mia casa ha un piccolo giardino.", "Il treno parte alle nove.",
           "Vorrei un bicchiere d'acqua.", "La macchina è nel garage.", "Domenica andiamo in montagna."],
    "ru": ["Доброе утро, как дела?", "Я пью кофе каждое утро.", "Сегодня хорошая погода.",
           "Завтра мы поедем на море.", "Мой брат работает в больнице.", "Собака спит в саду.",
           "Помоги мне, пожалуйста.", "Обед очень вкусный.", "Где находится вокзал?",
           "У меня сегодня нет времени.", "Дети играют в парке.", "Она покупает хлеб в булочной.",
           "В выходные мы навещаем бабушку и дедушку.", "Окно открыто.", "Я учу английский каждый вечер.",
           "С утра идёт дождь.", "Учитель пишет на доске.", "Который час?", "Мы ужинаем в восемь часов.",
           "У моего дома есть маленький сад."],
    "zh": ["早上好，你好吗？", "我每天早上喝一杯咖啡。", "今天天气很好。", "明天我们去海边。", "我哥哥在医院工作。",
           "小狗在花园里睡觉。", "请你帮我一下。", "这顿饭很好吃。", "火车站在哪里？", "我今天没有时间。",
           "孩子们在公园里玩。", "她在面包店买面包。", "周末我们去看爷爷奶奶。", "窗户开着。", "我每天晚上学习英语。",
           "从早上开始一直下雨。", "老师在黑板上写字。", "现在几点了？", "我们八点吃晚饭。", "我家有一个小花园。"],
}


def sentence(rng: np.random.Generator, language: str, heldout: bool) -> str:
    """A sentence in `language` from the held-out or the training side of the split: the side is a
    function of the text alone, so no sentence is ever spoken in both splits."""
    if language == "en":
        for _ in range(10_000):
            text = english_sentence(rng)
            if is_heldout(text) == heldout:
                return text
        raise RuntimeError("english sentence split sampling did not converge")
    pool = [s for s in BANKS[language] if is_heldout(s) == heldout]
    if not pool:
        raise RuntimeError(f"the {language} sentence bank has no {'held-out' if heldout else 'training'} sentences")
    return pool[int(rng.integers(len(pool)))]
