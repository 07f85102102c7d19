"""Sentences to speak: generators that make thousands of distinct sentences from a small vocabulary
a small model can learn (English, and subject-verb-object-place-time templates in six more languages),
plus fixed banks of everyday sentences in those six languages.

A held-out sentence is a new combination of words the model has heard in training. With banks alone
(about 20 sentences per language) every held-out sentence was new words, so no amount of training
could transcribe it; the templates make held-out ASR in those languages measure transcription.

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


# Subject-verb-object-place-time templates, one slot list per position: every entry is a complete,
# correctly inflected phrase (third person singular subjects and verbs, accusative objects), so any
# combination is grammatical even where it is odd ("reads a red door", like the English one).
TEMPLATES = {
    "de": {
        "subjects": ["der alte Mann", "meine Schwester", "ein kleiner Hund", "der Lehrer", "unser Nachbar",
                     "das kleine Mädchen", "mein Bruder", "die Ärztin", "eine junge Frau", "der Bauer", "mein Freund",
                     "der Pilot", "der Bäcker", "ihr Vater", "seine Mutter", "der Fahrer"],
        "verbs": ["öffnet", "malt", "liest", "findet", "trägt", "putzt", "kauft", "verkauft", "zeichnet", "repariert",
                  "wäscht", "hält", "bringt", "sucht", "zeigt", "braucht"],
        "objects": ["eine rote Tür", "die grüne Kiste", "ein altes Buch", "das blaue Auto", "einen warmen Mantel",
                    "die weiße Tasse", "einen langen Brief", "den kaputten Stuhl", "zwei Äpfel", "drei kleine Boote",
                    "die neue Karte", "eine schwere Tasche", "den Holztisch", "fünf schwarze Stifte",
                    "eine helle Lampe", "die kleine Uhr", "eine leere Flasche", "das Gartentor"],
        "places": ["im Garten", "am Bahnhof", "am Fluss", "in der Küche", "im Bus", "in der Schule", "am Fenster",
                   "im Park", "auf dem Markt", "am Strand", "im Büro", "oben"],
        "times": ["jeden Morgen", "am Sonntag", "nach dem Mittagessen", "vor dem Abendessen", "heute",
                  "in der Nacht", "am Montag", "am Abend", "diese Woche", "wieder"],
    },
    "es": {
        "subjects": ["el anciano", "mi hermana", "un perro pequeño", "el profesor", "nuestro vecino", "la niña",
                     "mi hermano", "la médica", "una mujer joven", "el granjero", "mi amigo", "el piloto",
                     "el panadero", "su padre", "su madre", "el conductor"],
        "verbs": ["abre", "pinta", "lee", "encuentra", "lleva", "limpia", "compra", "vende", "dibuja", "arregla",
                  "lava", "sostiene", "trae", "busca", "mira", "necesita"],
        "objects": ["una puerta roja", "la caja verde", "un libro viejo", "el coche azul", "un abrigo caliente",
                    "la taza blanca", "una carta larga", "la silla rota", "dos manzanas", "tres barcos pequeños",
                    "el mapa nuevo", "una bolsa pesada", "la mesa de madera", "cinco bolígrafos negros",
                    "una lámpara brillante", "el reloj pequeño", "una botella vacía", "la puerta del jardín"],
        "places": ["en el jardín", "en la estación", "cerca del río", "en la cocina", "en el autobús", "en la escuela",
                   "junto a la ventana", "en el parque", "en el mercado", "en la playa", "en la oficina", "arriba"],
        "times": ["cada mañana", "el domingo", "después del almuerzo", "antes de la cena", "hoy", "por la noche",
                  "el lunes", "por la tarde", "esta semana", "otra vez"],
    },
    "fr": {
        "subjects": ["le vieil homme", "ma sœur", "un petit chien", "le professeur", "notre voisin", "la petite fille",
                     "mon frère", "le médecin", "une jeune femme", "le fermier", "mon ami", "le pilote",
                     "le boulanger", "son père", "sa mère", "le chauffeur"],
        "verbs": ["ouvre", "peint", "lit", "trouve", "porte", "nettoie", "achète", "vend", "dessine", "répare", "lave",
                  "tient", "apporte", "cherche", "regarde", "montre"],
        "objects": ["une porte rouge", "la boîte verte", "un vieux livre", "la voiture bleue", "un manteau chaud",
                    "la tasse blanche", "une longue lettre", "la chaise cassée", "deux pommes", "trois petits bateaux",
                    "la nouvelle carte", "un sac lourd", "la table en bois", "cinq stylos noirs",
                    "une lampe brillante", "la petite horloge", "une bouteille vide", "le portail du jardin"],
        "places": ["dans le jardin", "à la gare", "près de la rivière", "dans la cuisine", "dans le bus", "à l'école",
                   "près de la fenêtre", "dans le parc", "au marché", "sur la plage", "au bureau", "en haut"],
        "times": ["chaque matin", "le dimanche", "après le déjeuner", "avant le dîner", "aujourd'hui", "la nuit",
                  "le lundi", "le soir", "cette semaine", "encore"],
    },
    "it": {
        "subjects": ["il vecchio", "mia sorella", "un piccolo cane", "l'insegnante", "il nostro vicino", "la bambina",
                     "mio fratello", "il medico", "una giovane donna", "il contadino", "il mio amico", "il pilota",
                     "il fornaio", "suo padre", "sua madre", "l'autista"],
        "verbs": ["apre", "dipinge", "legge", "trova", "porta", "pulisce", "compra", "vende", "disegna", "ripara",
                  "lava", "tiene", "cerca", "guarda", "mostra", "prende"],
        "objects": ["una porta rossa", "la scatola verde", "un libro vecchio", "la macchina blu", "un cappotto caldo",
                    "la tazza bianca", "una lettera lunga", "la sedia rotta", "due mele", "tre piccole barche",
                    "la mappa nuova", "una borsa pesante", "il tavolo di legno", "cinque penne nere",
                    "una lampada luminosa", "il piccolo orologio", "una bottiglia vuota", "il cancello del giardino"],
        "places": ["in giardino", "alla stazione", "vicino al fiume", "in cucina", "sull'autobus", "a scuola",
                   "vicino alla finestra", "nel parco", "al mercato", "sulla spiaggia", "in ufficio", "di sopra"],
        "times": ["ogni mattina", "domenica", "dopo pranzo", "prima di cena", "oggi", "di notte", "lunedì",
                  "la sera", "questa settimana", "di nuovo"],
    },
    "ru": {
        "subjects": ["старик", "моя сестра", "маленькая собака", "учитель", "наш сосед", "маленькая девочка",
                     "мой брат", "врач", "молодая женщина", "фермер", "мой друг", "пилот", "пекарь", "её отец",
                     "его мать", "водитель"],
        "verbs": ["открывает", "рисует", "читает", "находит", "несёт", "чистит", "покупает", "продаёт", "чинит",
                  "моет", "держит", "приносит", "ищет", "показывает", "берёт", "видит"],
        "objects": ["красную дверь", "зелёную коробку", "старую книгу", "синюю машину", "тёплое пальто",
                    "белую чашку", "длинное письмо", "сломанный стул", "два яблока", "три маленькие лодки",
                    "новую карту", "тяжёлую сумку", "деревянный стол", "пять чёрных ручек", "яркую лампу",
                    "маленькие часы", "пустую бутылку", "садовую калитку"],
        "places": ["в саду", "на вокзале", "у реки", "на кухне", "в автобусе", "в школе", "у окна", "в парке",
                   "на рынке", "на пляже", "в офисе", "наверху"],
        "times": ["каждое утро", "в воскресенье", "после обеда", "перед ужином", "сегодня", "ночью",
                  "в понедельник", "вечером", "на этой неделе", "снова"],
    },
    # Chinese puts time and place before the verb: subject, time, place, verb, object.
    "zh": {
        "subjects": ["老人", "我姐姐", "一只小狗", "老师", "我们的邻居", "小女孩", "我哥哥", "医生", "一个年轻女人",
                     "农民", "我的朋友", "飞行员", "面包师", "她的爸爸", "他的妈妈", "司机"],
        "verbs": ["打开", "画", "读", "找到", "拿着", "打扫", "买", "卖", "修理", "洗", "带来", "找", "看", "喜欢",
                  "需要", "搬"],
        "objects": ["一扇红门", "那个绿盒子", "一本旧书", "那辆蓝色的车", "一件暖和的外套", "那个白杯子", "一封长信",
                    "那把坏椅子", "两个苹果", "三条小船", "那张新地图", "一个重包", "那张木桌子", "五支黑笔",
                    "一盏亮灯", "那个小钟", "一个空瓶子", "花园的门"],
        "places": ["在花园里", "在车站", "在河边", "在厨房里", "在公共汽车上", "在学校", "在窗户旁边", "在公园里",
                   "在市场上", "在海滩上", "在办公室", "在楼上"],
        "times": ["每天早上", "星期天", "午饭后", "晚饭前", "今天", "晚上", "星期一", "傍晚", "这个星期"],
    },
}
BANK_SHARE = 0.2  # of non-English sentences from the fixed banks, the rest from the templates


def template_sentence(rng: np.random.Generator, language: str) -> str:
    """Subject verb object [place] [time] in `language` (Chinese: subject [time] [place] verb object)."""
    t = TEMPLATES[language]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    subject, verb, obj = pick(t["subjects"]), pick(t["verbs"]), pick(t["objects"])
    place = pick(t["places"]) if rng.random() < 0.7 else ""
    time = pick(t["times"]) if rng.random() < 0.5 else ""
    if language == "zh":
        return "".join([subject, time, place, verb, obj]) + "。"
    return _sentence(" ".join(x for x in (subject, verb, obj, place, time) if x))


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
    if language == "en" or rng.random() >= BANK_SHARE:
        generate = english_sentence if language == "en" else (lambda r: template_sentence(r, language))
        for _ in range(10_000):
            text = generate(rng)
            if is_heldout(text) == heldout:
                return text
        raise RuntimeError(f"{language} sentence split sampling did not converge")
    pool = [s for s in BANKS[language] if is_heldout(s) == heldout]
    if not pool:
        raise RuntimeError(f"the {language} sentence bank has no {'held-out' if heldout else 'training'} sentences")
    return pool[int(rng.integers(len(pool)))]
