"""Topic constraints: "the continuation mentions a word of the topic", the bag-of-words attributes of
controllable-generation studies (science, politics, military, religion, computers, space, legal).

:func:`topic_constraint` is a :class:`~steer.constraints.KeywordConstraint` in ``any_of`` mode over one
topic's word list (:data:`TOPICS`, whole-word and case-insensitive matching; extend it with ``extra_words`` or
give your own ``words``). Its ``token_evidence`` is ``"satisfaction"``: a token whose text is a topic word
settles the constraint, every other token says nothing about it on its own, so whether a prefix is heading for
the topic is what the learned guidance model has to predict (:mod:`steer.guidance.oracle_priors`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .keyword import KeywordConstraint

__all__ = ["TOPICS", "topic_constraint"]

# Common words of each topic, singular and plural forms written out (matching is whole-word).
_WORDS = {
    "science": """
        science sciences scientist scientists scientific research researcher researchers experiment
        experiments laboratory lab theory theories hypothesis physics chemistry biology molecule molecules
        atom atoms cell cells gene genes evolution species data study studies evidence measurement
        microscope particle particles energy climate vaccine protein dna neuroscience
    """,
    "politics": """
        politics political politician politicians government governments election elections vote votes voter
        voters voting democrat democrats republican republicans congress senate senator senators parliament
        president presidential campaign policy policies legislation governor mayor party parties liberal
        conservative minister ballot candidate candidates administration lawmakers
    """,
    "military": """
        military army armies navy soldier soldiers troops war wars weapon weapons combat battle battles
        missile missiles tank tanks general officer officers marine marines airforce regiment battalion
        invasion defense defence veteran veterans sergeant commander artillery drone drones ammunition
        deployment pentagon warfare
    """,
    "religion": """
        religion religions religious god gods church churches faith pray prayer prayers bible jesus christ
        christian christians muslim muslims islam jewish judaism hindu buddhist temple mosque synagogue
        priest priests pastor holy sacred spiritual worship heaven hell sin soul scripture pope saint
    """,
    "computers": """
        computer computers software hardware program programs programming code coding algorithm algorithms
        internet online website web app apps server servers database network networks laptop processor cpu
        gpu chip chips digital technology linux windows keyboard screen cyber hacker hackers download email
        robot
    """,
    "space": """
        space planet planets star stars galaxy galaxies universe orbit orbits moon moons mars jupiter saturn
        astronaut astronauts nasa rocket rockets satellite satellites telescope spacecraft cosmic asteroid
        comet solar launch mission astronomy astronomer gravity lunar spaceship nebula cosmos meteor venus
        mercury
    """,
    "legal": """
        law laws legal illegal court courts judge judges jury lawyer lawyers attorney attorneys lawsuit
        lawsuits trial trials sue sued verdict sentence sentenced prosecutor prosecutors defendant plaintiff
        appeal crime crimes criminal police arrest arrested charges charged guilty innocent justice
        constitution statute
    """,
}
TOPICS: dict[str, tuple[str, ...]] = {topic: tuple(words.split()) for topic, words in _WORDS.items()}


def topic_constraint(
    topic: str | None = None,
    *,
    words: Sequence[str] | None = None,
    extra_words: Sequence[str] = (),
    name: str | None = None,
) -> KeywordConstraint:
    """``P(satisfied) = 1`` when the text mentions a word of ``topic`` (a key of :data:`TOPICS`) or of ``words``
    (your own list), plus ``extra_words``; else 0."""
    if (topic is None) == (words is None):
        raise ValueError(
            f"topic_constraint takes exactly one of topic= (one of {', '.join(TOPICS)}) or words="
        )
    if topic is not None and topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; available: {', '.join(TOPICS)} (or pass words=)")
    if isinstance(words, str) or isinstance(extra_words, str):
        raise TypeError("topic_constraint expects lists of words, not a single string")
    vocabulary = list(dict.fromkeys([*(TOPICS[topic] if topic is not None else words), *extra_words]))
    return KeywordConstraint(vocabulary, mode="any_of", name=name or f"topic[{topic or 'custom'}]")
