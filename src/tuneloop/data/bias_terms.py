"""Protected-attribute terms the data report counts per label.

A record "mentions" a category when any of its words (lower-cased, whole words) is in the category's
list. The lists are deliberately short, common English words: they are a smoke detector for skew (a label
that co-occurs with "women" three times as often as another label), not a classifier of identity. A
mention is not bias; a large difference in mention rates between labels is worth a look, because a model
trained on it learns the shortcut. Extend a list by adding words; a new category is a new key."""

from __future__ import annotations

import re

BIAS_TERMS: dict[str, frozenset[str]] = {
    "gender": frozenset(
        "he him his himself she her hers herself man men woman women male males female females boy boys girl "
        "girls husband husbands wife wives mother mothers father fathers mom moms dad dads son sons daughter "
        "daughters brother brothers sister sisters gentleman gentlemen lady ladies guy guys gal gals "
        "boyfriend girlfriend transgender nonbinary".split()),
    "race_ethnicity": frozenset(
        "black white asian asians african africans hispanic hispanics latino latina latinos latinas latinx "
        "caucasian caucasians arab arabs indigenous native mexican mexicans chinese japanese korean indian "
        "indians european europeans immigrant immigrants ethnic ethnicity race racial".split()),
    "religion": frozenset(
        "christian christians christianity catholic catholics protestant muslim muslims islam islamic jewish "
        "jew jews judaism hindu hindus hinduism buddhist buddhists buddhism sikh sikhs atheist atheists "
        "church mosque synagogue temple religious religion god bible quran kosher halal".split()),
    "age": frozenset(
        "old older elderly senior seniors young younger youth teen teens teenager teenagers kid kids child "
        "children baby babies toddler toddlers millennial millennials boomer boomers retiree retirees "
        "grandma grandpa grandmother grandfather aged ageing aging".split()),
    "disability": frozenset(
        "disabled disability disabilities handicapped blind deaf mute wheelchair autistic autism adhd "
        "dyslexic dyslexia paralyzed paraplegic amputee impaired impairment crippled diabetic diabetes "
        "celiac".split()),
}

_WORD = re.compile(r"[a-z]+")


def categories_in(text: str) -> set[str]:
    words = set(_WORD.findall(text.lower()))
    return {c for c, terms in BIAS_TERMS.items() if words & terms}
