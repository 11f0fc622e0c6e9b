"""Keyword / callable / classifier oracles, composition math and NaN masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steer.constraints import (
    AllOf,
    AnyOf,
    CallableConstraint,
    ClassifierConstraint,
    Constraint,
    KeywordConstraint,
    NonToxic,
    Not,
    Threshold,
)
from steer.errors import UserInputError


class _Fixed(Constraint):
    """Scores from a table (NaN/None allowed)."""

    def __init__(self, table, name="fixed"):
        super().__init__()
        self.table = table
        self.name = name

    def score(self, texts):
        return [self.table[t] for t in texts]


# ---- keywords -----------------------------------------------------------------------------------


def test_keyword_none_of_uses_word_boundaries_and_ignores_case():
    c = KeywordConstraint(banned=["ass", "shut up", "f*ck"])
    texts = [
        "a class assessment",  # substrings only: fine
        "What an ASS.",  # whole word, other case
        "shut\n  up now",  # phrase across whitespace
        "shutup",  # not the phrase
        "oh f*ck!",  # literal special characters
        "fuck",  # not the literal keyword
        "ass_hat",  # '_' is a word character: no match
        "",
    ]
    assert c(texts).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert c.matches("Shut up, you ass") == ["ass", "shut up"]


def test_keyword_all_of_any_of_and_case_sensitivity():
    all_of = KeywordConstraint(["dog", "park"], mode="all_of")
    assert all_of(["The dog ran to the park.", "the dog", "parking dogs", "PARK DOG"]).tolist() == [
        1,
        0,
        0,
        1,
    ]
    any_of = KeywordConstraint(keywords=["dog", "park"], mode="any_of")
    assert any_of(["a dog", "a cat", "the park"]).tolist() == [1, 0, 1]
    sensitive = KeywordConstraint(["Bob"], mode="all_of", case_sensitive=True)
    assert sensitive(["Bob is here", "bob is here"]).tolist() == [1, 0]


def test_keyword_bad_arguments():
    with pytest.raises(ValueError, match="unknown KeywordConstraint mode 'some_of'"):
        KeywordConstraint(["a"], mode="some_of")
    with pytest.raises(ValueError, match="exactly one"):
        KeywordConstraint(["a"], banned=["b"])
    with pytest.raises(TypeError, match="list of keywords"):
        KeywordConstraint("abc")
    with pytest.raises(ValueError, match="empty keyword"):
        KeywordConstraint(["  "])


# ---- callables ----------------------------------------------------------------------------------


def test_callable_constraint_batched_and_per_text_failures_are_masked():
    batched = CallableConstraint(lambda texts: [len(t) / 10 for t in texts], name="length")
    assert batched(["abc", "abcdefghij"]).tolist() == pytest.approx([0.3, 1.0])
    assert batched.name == "length"

    def fragile(text):
        if text == "boom":
            raise RuntimeError("backend down")
        return {"yes": True, "no": False, "nan": math.nan, "none": None}.get(text, 0.25)

    c = CallableConstraint(fragile, batched=False)
    scores = c.evaluate(["yes", "no", "boom", "nan", "none", "other"])
    assert scores.valid.tolist() == [True, True, False, False, False, True]
    assert scores.probs.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0, 0.25])
    assert c.stats == {"scored": 6, "invalid": 3}
    strict = CallableConstraint(fragile, batched=False, raise_errors=True)
    with pytest.raises(RuntimeError, match="backend down"):
        strict(["boom"])
    with pytest.raises(TypeError, match="callable"):
        CallableConstraint(3)


# ---- composition --------------------------------------------------------------------------------


def test_all_of_is_the_product_and_masks_any_invalid_member():
    a = _Fixed({"x": 0.5, "y": 0.9, "z": math.nan, "w": 1.0}, "a")
    b = _Fixed({"x": 0.4, "y": None, "z": 0.3, "w": 0.25}, "b")
    both = AllOf([a, b])
    scores = both.evaluate(["x", "y", "z", "w"])
    assert scores.valid.tolist() == [True, False, False, True]
    assert scores.probs.tolist() == pytest.approx([0.2, 0.0, 0.0, 0.25])
    assert both.stats == {"scored": 4, "invalid": 2}
    assert a.stats["invalid"] == 1 and b.stats["invalid"] == 1
    assert both.name == "all_of(a, b)"
    with pytest.raises(ValueError, match="at least one"):
        AllOf([])
    with pytest.raises(TypeError, match="Constraint instances"):
        AllOf([lambda t: 1.0])


def test_any_of_not_threshold_math():
    a = _Fixed({"x": 0.5, "y": 0.2}, "a")
    b = _Fixed({"x": 0.4, "y": 0.0}, "b")
    assert AnyOf([a, b])(["x", "y"]).tolist() == pytest.approx([1 - 0.5 * 0.6, 0.2])
    assert Not(a)(["x", "y"]).tolist() == pytest.approx([0.5, 0.8])
    assert Threshold(a, 0.5)(["x", "y"]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="threshold"):
        Threshold(a, 2.0)
    nan = _Fixed({"q": math.nan})
    assert Not(nan).evaluate(["q"]).valid.tolist() == [False]


def test_all_of_keyword_and_profanity():
    combined = AllOf([NonToxic(), KeywordConstraint(["dog"], mode="all_of")])
    polite_dog, polite, rude_dog = combined(
        ["what a lovely dog", "what a lovely day", "fuck this dog"]
    ).tolist()
    assert polite_dog > 0.5 and polite == 0.0 and rude_dog < 0.5


# ---- profanity backend --------------------------------------------------------------------------


def test_profanity_labels_threshold_and_is_toxic():
    oracle = NonToxic(threshold=0.5)
    assert oracle.is_toxic(["have a nice day", "you fucking idiot"]).tolist() == [False, True]
    assert oracle.all_scores(["hi"])["toxicity"].shape == (1,)
    with pytest.raises(ValueError, match=r"unknown label 'insult'.*available labels: toxicity"):
        NonToxic(label="insult")
    with pytest.raises(ValueError, match="threshold"):
        NonToxic(threshold=1.5)


# ---- HF sequence classifier ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path = tmp_path_factory.mktemp("classifier")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *"abcdefghijklmnopqrstuvwxyz",
        "good",
        "bad",
        "day",
    ]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_classifier_constraint_probabilities_labels_and_batching(tiny_classifier):
    texts = ["a good day", "bad", "", "good " * 500, "the quick brown fox"]
    pos = ClassifierConstraint(str(tiny_classifier), positive_label="positive", batch_size=2, device="cpu")
    neg = ClassifierConstraint(str(tiny_classifier), positive_label=0, device="cpu")
    neu = ClassifierConstraint(str(tiny_classifier), positive_label="neutral", device="cpu")
    p = pos(texts).double() + neg(texts).double() + neu(texts).double()
    assert torch.allclose(p, torch.ones(len(texts), dtype=torch.float64), atol=1e-5)  # softmax head
    assert pos.labels == ["negative", "neutral", "positive"]
    not_pos = ClassifierConstraint(str(tiny_classifier), positive_label="positive", negate=True)
    assert torch.allclose(not_pos(texts), 1 - pos(texts), atol=1e-6)
    pos.runner.batch_size = 1
    one = pos(texts)
    pos.runner.batch_size = 64
    assert torch.allclose(one, pos(texts), atol=1e-5)
    assert pos(texts).std() > 1e-3
    assert pos.evaluate(texts).valid.all()
    assert len(pos.runner.tokenize(["good " * 500])[0]) == 64  # truncated to the position table


def test_classifier_constraint_errors(tiny_classifier):
    with pytest.raises(
        ValueError, match=r"unknown label 'toxic'.*available labels: negative, neutral, positive"
    ):
        ClassifierConstraint(str(tiny_classifier), positive_label="toxic")
    with pytest.raises(ValueError, match="unknown label 5"):
        ClassifierConstraint(str(tiny_classifier), positive_label=5)
    with pytest.raises(ValueError, match="model_name_or_path"):
        ClassifierConstraint(positive_label="positive")


def test_classifier_constraint_multilabel_uses_sigmoid(tiny_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    model.config.problem_type = "multi_label_classification"
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    c = ClassifierConstraint(model=model, tokenizer=tokenizer, positive_label="positive")
    assert c.runner.activation == "sigmoid"
    with torch.inference_mode():
        logits = model(**tokenizer(["a good day"], return_tensors="pt")).logits
    assert c(["a good day"]).item() == pytest.approx(torch.sigmoid(logits[0, 2]).item(), abs=1e-5)
    assert isinstance(c.score(["x"]), np.ndarray)


def _tiny_decoder_classifier():
    """A random 2-label Llama sequence classifier and the tiny BPE tokenizer it reads."""
    from transformers import AutoConfig, LlamaForSequenceClassification

    from steer.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=2,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config), tokenizer


@pytest.mark.parametrize("side", ["left", "right"])
def test_classifier_constraint_on_a_decoder_classifier_is_padding_invariant(side):
    model, tokenizer = _tiny_decoder_classifier()
    tokenizer.padding_side = side
    c = ClassifierConstraint(model=model, tokenizer=tokenizer, positive_label=1, device="cpu")
    assert model.config.pad_token_id == tokenizer.pad_token_id  # set so the last real token is found
    texts = ["a", "the quick dog runs over the road today", "", "hello " * 300, "we agree"]
    batched = c(texts)
    c.runner.batch_size = 1
    assert torch.allclose(batched, c(texts), atol=1e-5)
    assert batched.std() > 1e-3


def test_fingerprints_follow_what_decides_the_scores(tiny_classifier):
    """The token-prior cache is keyed by the fingerprint: equal only when the scores must be equal."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    a = ClassifierConstraint(str(tiny_classifier), positive_label="positive", device="cpu")
    b = ClassifierConstraint(str(tiny_classifier), positive_label="positive", device="cpu")
    assert a.fingerprint() == b.fingerprint()
    assert (
        a.fingerprint() != ClassifierConstraint(str(tiny_classifier), positive_label="negative").fingerprint()
    )
    assert (
        a.fingerprint()
        != ClassifierConstraint(
            str(tiny_classifier), positive_label="positive", activation="sigmoid"
        ).fingerprint()
    )
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    with torch.no_grad():  # retrained weights at the same path: another oracle
        model.classifier.bias.add_(0.5)
    retrained = ClassifierConstraint(
        model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_classifier), positive_label="positive"
    )
    assert retrained.fingerprint() != a.fingerprint()

    def make(value):
        return CallableConstraint(lambda texts: [value] * len(texts))

    assert make(1.0).fingerprint() != make(0.0).fingerprint()  # same code, other closure value
    assert make(1.0).fingerprint() == make(1.0).fingerprint()
    assert (
        CallableConstraint(lambda t: [1.0] * len(t)).fingerprint()
        != CallableConstraint(lambda t: [0.5] * len(t)).fingerprint()
    )
    assert KeywordConstraint(banned=["x"]).fingerprint() != KeywordConstraint(banned=["y"]).fingerprint()


def test_topic_constraints_are_any_of_word_lists_with_satisfaction_evidence():
    from steer.constraints import TOPICS, build_constraint, topic_constraint

    assert set(TOPICS) == {"science", "politics", "military", "religion", "computers", "space", "legal"}
    for topic, words in TOPICS.items():
        assert len(words) == len(set(words)) >= 30, topic
    space = build_constraint("topic", {"topic": "space"})
    assert space.name == "topic[space]" and space.mode == "any_of" and space.token_evidence == "satisfaction"
    scores = space(
        ["The astronauts reached the Moon.", "A quiet morning.", "moonlight", "Spacey jokes."]
    ).tolist()
    assert scores == [1.0, 0.0, 0.0, 0.0]  # whole words only
    own = topic_constraint(words=["tea"], extra_words=["coffee"])
    assert own(["green tea", "black coffee", "water"]).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="unknown topic 'sports'"):
        topic_constraint("sports")
    with pytest.raises(ValueError, match="exactly one of"):
        topic_constraint("space", words=["x"])
    with pytest.raises(UserInputError, match="constraint_kwargs"):
        build_constraint("topic", {"topic": "cooking"})


def test_decoder_classifier_scores_every_prefix_in_one_pass():
    """The score at token j of one pass is the classifier's score of the first j + 1 tokens on their own."""
    from steer.constraints.base import Constraint
    from steer.models import tiny_tokenizer

    model, tokenizer = _tiny_decoder_classifier()
    c = ClassifierConstraint(model=model, tokenizer=tokenizer, positive_label=1, negate=True, batch_size=2)
    rows = [
        tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in ["the quick dog runs", "we", "a b c d e f"]
    ]
    fast = c.prefix_probs(rows, tokenizer)
    assert [len(p) for p in fast] == [len(r) for r in rows]
    with torch.inference_mode():
        for row, probs in zip(rows, fast):
            for j in range(len(row)):
                logits = model(input_ids=torch.tensor([row[: j + 1]])).logits.float()
                assert float(probs[j]) == pytest.approx(1 - float(torch.softmax(logits, -1)[0, 1]), abs=1e-5)
    assert torch.cat(fast).std() > 1e-4
    # A tokenizer with other ids (or an encoder classifier): each prefix is decoded and scored on its own.
    other = tiny_tokenizer(vocab_size=300)
    slow = c.prefix_probs([[5, 6, 7]], other)
    texts = other.batch_decode([[5], [5, 6], [5, 6, 7]], skip_special_tokens=True)
    assert torch.allclose(slow[0], c(texts), atol=1e-6)
    assert torch.allclose(Constraint.prefix_probs(c, [[5, 6, 7]], other)[0], slow[0])


def test_encoder_classifier_prefix_probs_decode_each_prefix(tiny_classifier):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    c = ClassifierConstraint(str(tiny_classifier), positive_label="positive", device="cpu")
    assert not c.runner.scores_every_position()
    row = tokenizer("a good day", add_special_tokens=False)["input_ids"]
    probs = c.prefix_probs([row, []], tokenizer)
    texts = tokenizer.batch_decode([row[: j + 1] for j in range(len(row))], skip_special_tokens=True)
    assert torch.allclose(probs[0], c(texts), atol=1e-6) and probs[1].numel() == 0
