"""Chinese text normalisation for CER scoring, reproducing speechio's ``cn_tn.py`` rules.

Qwen2-Audio's ASR scorer normalises Chinese references and hypotheses with speechio's ``TextNorm``
(all options off: no full-width folding, no case change, no filler/erhua removal), i.e. two steps:

1. non-standard words -> Chinese characters, in this order: dates, money, mobile numbers, landline
   numbers, fractions, percentages, numbers followed by a measure word, digit strings of 4+ digits
   (read digit by digit), any remaining number (read as a cardinal with 十/百/千/万/亿 units);
2. every Chinese and ASCII punctuation mark becomes a space.

No package on PyPI ships these rules without heavy dependencies (WeTextProcessing needs pynini),
so this is a port written for this project. The replacement order and its quirks (each match is
substituted at the *first* occurrence of its text, money numbers at every occurrence) are kept on
purpose: the point is to score exactly like the official script, not to normalise well.
"""

from __future__ import annotations

import re
import string

DIGITS = "零一二三四五六七八九"
LIANG = "两"  # "two" before a unit of 百 and above: 两百, 两千, 两万
POINT = "点"
# (power of ten, character), largest first; from 万 on the 'mid' system multiplies by 10^4 per step.
UNITS = [(44, "载"), (40, "正"), (36, "涧"), (32, "沟"), (28, "穰"), (24, "秭"), (20, "垓"), (16, "京"),
         (12, "兆"), (8, "亿"), (4, "万"), (3, "千"), (2, "百"), (1, "十")]

CURRENCY_UNITS = r"((亿|千万|百万|万|千|百)|(亿|千万|百万|万|千|百|)元|(亿|千万|百万|万|千|百|)块|角|毛|分)"
MEASURE_WORDS = (
    "(匹|张|座|回|场|尾|条|个|首|阙|阵|网|炮|顶|丘|棵|只|支|袭|辆|挑|担|颗|壳|窠|曲|墙|群|腔|砣|座|客|贯|扎|捆|刀|令|打|"
    "手|罗|坡|山|岭|江|溪|钟|队|单|双|对|出|口|头|脚|板|跳|枝|件|贴|针|线|管|名|位|身|堂|课|本|页|家|户|层|丝|毫|厘|分|"
    "钱|两|斤|担|铢|石|钧|锱|忽|(千|毫|微)克|毫|厘|分|寸|尺|丈|里|寻|常|铺|程|(千|分|厘|毫|微)米|撮|勺|合|升|斗|石|盘|"
    "碗|碟|叠|桶|笼|盆|盒|杯|钟|斛|锅|簋|篮|盘|桶|罐|瓶|壶|卮|盏|箩|箱|煲|啖|袋|钵|年|月|日|季|刻|时|周|天|秒|分|旬|"
    "纪|岁|世|更|夜|春|夏|秋|冬|代|伏|辈|丸|泡|粒|颗|幢|堆|条|根|支|道|面|片|张|颗|块)"
)

DATE_RE = re.compile(r"\D+((([089]\d|(19|20)\d{2})年)?(\d{1,2}月(\d{1,2}[日号])?)?)")
MONEY_RE = re.compile(r"\D+((\d+(\.\d+)?)[多余几]?" + CURRENCY_UNITS + r"(\d" + CURRENCY_UNITS + r"?)?)")
MOBILE_RE = re.compile(r"\D((\+?86 ?)?1([38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D")
LANDLINE_RE = re.compile(r"\D((0(10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D")
FRACTION_RE = re.compile(r"(\d+/\d+)")
PERCENT_RE = re.compile(r"(\d+(\.\d+)?%)")
MEASURED_RE = re.compile(r"(\d+(\.\d+)?)[多余几]?" + MEASURE_WORDS)
DIGIT_STRING_RE = re.compile(r"(\d{4,32})")
NUMBER_RE = re.compile(r"(\d+(\.\d+)?)")
LATIN_TWO_RE = re.compile(r"(([a-zA-Z]+)二([a-zA-Z]+))")  # B2B, P2P, O2O were read as B二B

# Punctuation (from the Zhon project's lists, as speechio uses them) plus ASCII punctuation.
CN_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟"
                  "〰〾〿–—‘’‛“”„‟…‧﹏·〈〉-")
PUNCTUATION = CN_PUNCTUATION + string.punctuation
_TO_SPACE = str.maketrans(PUNCTUATION, " " * len(PUNCTUATION))
# Full-width ASCII (U+FF01..U+FF5E) and the ideographic space -> their half-width forms.
_TO_HALF_WIDTH = {0x3000: " ", **{c: chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)}}


# ---- numbers -> characters ---------------------------------------------------------------------
def _integer_symbols(text: str) -> list[tuple[str, int]]:
    """Decimal digits -> [('d', digit) | ('u', power)], e.g. '1005' -> 一 千 零 五.

    Leading zeros of a part split off by a unit are kept on purpose: they become the 零 of
    '一万零一百' (10100).
    """
    body = text.lstrip("0")
    if not body:
        return []
    if len(body) == 1:
        return ([("d", 0)] if len(body) != len(text) else []) + [("d", int(body))]
    power = next(p for p, _ in UNITS if p < len(body))
    return _integer_symbols(text[:-power]) + [("u", power)] + _integer_symbols(body[-power:])


def spell_number(number: str, use_units: bool = True, use_liang: bool = True) -> str:
    """'2983.07' -> 两千九百八十三点零七; with use_units=False the digits are read one by one."""
    whole, _, decimals = number.partition(".")
    if "." in decimals:
        raise ValueError(f"invalid number with more than one dot: {number}")
    if use_units and len(whole) > 1:
        symbols = _integer_symbols(whole)
    else:
        symbols = [("d", int(c)) for c in whole]
    if decimals:
        symbols = symbols + [("p", 0)] + [("d", int(c)) for c in decimals]
    unit_names = dict(UNITS)
    out = []
    for i, (kind, value) in enumerate(symbols):
        if kind == "u":
            out.append(unit_names[value])
        elif kind == "p":
            out.append(POINT)
        else:
            before = symbols[i - 1] if i > 0 else None
            after = symbols[i + 1] if i + 1 < len(symbols) else None
            two_before_big_unit = (value == 2 and after is not None and after[0] == "u" and after[1] != 1
                                   and (before is None or (before[0] == "u" and before[1] != 1)))
            out.append(LIANG if use_liang and two_before_big_unit else DIGITS[value])
    result = "".join(out)
    if result.startswith(POINT):
        return DIGITS[0] + result
    if result.startswith("一十"):  # 10..19 are read 十, 十一, ... (also 十万 for 100000)
        result = result[1:]
    return result


def spell_digits(number: str) -> str:
    return spell_number(number, use_units=False, use_liang=False)


def _date(text: str) -> str:
    year, sep, rest = text.strip().partition("年")
    if not sep:
        year, rest = "", text
    else:
        year = spell_digits(year) + "年"
    month = day = ""
    if rest:
        month, sep, day = rest.strip().partition("月")
        if sep:
            month = spell_number(month) + "月"
        else:
            month, day = "", text
        if day:
            day = spell_number(day[:-1]) + day[-1]
    return year + month + day


def _money(text: str) -> str:
    for number, _ in NUMBER_RE.findall(text):
        text = text.replace(number, spell_number(number))  # every occurrence, as speechio does
    return text


def _phone(text: str, landline: bool) -> str:
    parts = text.split("-") if landline else text.strip("+").split()
    return "".join(spell_digits(p) for p in parts)


def _fraction(text: str) -> str:
    numerator, denominator = text.split("/")
    return spell_number(denominator) + "分之" + spell_number(numerator)


def _percentage(text: str) -> str:
    return "百分之" + spell_number(text.strip().strip("%"))


def normalize_numbers(text: str) -> str:
    """Step 1: non-standard words (numbers, dates, money, phone numbers, ...) -> Chinese characters."""
    # The sentinels give the patterns that need a non-digit before/after something to match at the ends.
    text = "^" + text + "$"

    def each(matches, rewrite):
        nonlocal text
        for match in matches:
            text = text.replace(match, rewrite(match), 1)

    each([m[0] for m in DATE_RE.findall(text)], _date)
    each([m[0] for m in MONEY_RE.findall(text)], _money)
    each([m[0] for m in MOBILE_RE.findall(text)], lambda s: _phone(s, landline=False))
    each([m[0] for m in LANDLINE_RE.findall(text)], lambda s: _phone(s, landline=True))
    each(FRACTION_RE.findall(text), _fraction)
    text = text.replace("％", "%")
    each([m[0] for m in PERCENT_RE.findall(text)], _percentage)
    each([m[0] for m in MEASURED_RE.findall(text)], spell_number)
    each(DIGIT_STRING_RE.findall(text), spell_digits)
    each([m[0] for m in NUMBER_RE.findall(text)], spell_number)
    for whole, left, right in LATIN_TWO_RE.findall(text):
        text = text.replace(whole, f"{left}2{right}", 1)
    return text.lstrip("^").rstrip("$")


def normalize_chinese(text: str, to_half_width: bool = False, to_upper: bool = False) -> str:
    """speechio TextNorm with Qwen2-Audio's settings (both options off), then punctuation -> spaces."""
    if to_half_width:
        text = text.translate(_TO_HALF_WIDTH)
    if to_upper:
        text = text.upper()
    return normalize_numbers(text).translate(_TO_SPACE)
