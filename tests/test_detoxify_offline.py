"""NonToxic(backend="detoxify") through the real loading path, with a fabricated random-weight checkpoint."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from steer.constraints import NonToxic, load_detoxify, write_random_detoxify_checkpoint
from steer.constraints.toxicity import read_detoxify_checkpoint

TEXTS = [
    "you are a nice person",
    "",
    "I hate you, you stupid idiot!",
    "have a good day " * 3,
    "Hello World",
    "no",
    "they say the people of the world work hard and need to feel good",
    "x" * 3,
]


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory):
    """(checkpoint recording the hub id 'bert-base-uncased', config dir, checkpoint recording the local dir)."""
    root = tmp_path_factory.mktemp("detoxify")
    config_dir = root / "bert-tiny"
    hub_ckpt = write_random_detoxify_checkpoint(root / "toxic_tiny.ckpt", config_dir, seed=0)
    local_ckpt = write_random_detoxify_checkpoint(
        root / "toxic_tiny_local.ckpt", config_dir, seed=0, model_type=str(config_dir)
    )
    return hub_ckpt, config_dir, local_ckpt


@pytest.fixture(scope="module")
def oracle(tiny_detoxify):
    ckpt, config_dir, _ = tiny_detoxify
    return NonToxic("detoxify", checkpoint=ckpt, config_dir=config_dir, device="cpu")


def test_checkpoint_format_and_standardised_labels(tiny_detoxify, oracle):
    loaded = read_detoxify_checkpoint(checkpoint=tiny_detoxify[0])
    assert set(loaded) == {"config", "state_dict"}
    assert (
        loaded["config"]["arch"]["args"]["model_type"] == "bert-base-uncased"
    )  # never resolved: config_dir wins
    assert oracle.labels == ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]
    assert oracle.runner.model.config.num_hidden_layers == 2


def test_predicts_on_strings_and_matches_detoxify_itself(tiny_detoxify, oracle):
    from detoxify import Detoxify

    probs = oracle(TEXTS)
    tox = oracle.toxicity(TEXTS)
    assert probs.shape == (len(TEXTS),) and probs.dtype == torch.float32
    assert np.allclose(probs.numpy(), 1.0 - tox, atol=1e-6)
    assert ((tox > 0) & (tox < 1)).all() and tox.std() > 1e-3  # random weights still separate texts
    # detoxify's own loader (offline only when the checkpoint names the local dir) gives the same scores
    reference = Detoxify(checkpoint=str(tiny_detoxify[2]), huggingface_config_path=str(tiny_detoxify[1]))
    expected = reference.predict(TEXTS)
    all_scores = oracle.all_scores(TEXTS)
    assert set(all_scores) == set(expected)
    for label in expected:
        assert np.allclose(all_scores[label], expected[label], atol=1e-5), label


def test_scores_do_not_depend_on_batch_size(oracle):
    texts = TEXTS * 9  # 72 texts of mixed lengths
    oracle.runner.batch_size = 64
    batched = oracle.toxicity(texts)
    oracle.runner.batch_size = 1
    try:
        single = oracle.toxicity(texts)
    finally:
        oracle.runner.batch_size = 64
    assert np.abs(batched - single).max() < 1e-5
    assert np.allclose(batched[: len(TEXTS)], batched[len(TEXTS) : 2 * len(TEXTS)], atol=1e-6)


def test_batches_are_length_sorted_and_run_under_inference_mode(oracle, monkeypatch):
    seen = []

    def hook(module, args, kwargs):
        seen.append(
            (kwargs["input_ids"].shape, torch.is_inference_mode_enabled(), kwargs["input_ids"].device)
        )

    handle = oracle.runner.model.register_forward_pre_hook(hook, with_kwargs=True)
    oracle.runner.batch_size = 3
    try:
        oracle.toxicity(TEXTS)
    finally:
        handle.remove()
        oracle.runner.batch_size = 64
    widths = [shape[1] for shape, _, _ in seen]
    assert [shape[0] for shape, _, _ in seen] == [3, 3, 2]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    lengths = sorted((len(ids) for ids in oracle.runner.tokenize(TEXTS)), reverse=True)
    assert widths == [lengths[0], lengths[3], lengths[6]]  # each batch pads only to its own longest text
    assert all(inference for _, inference, _ in seen)
    assert all(device.type == "cpu" for _, _, device in seen)


def test_empty_and_very_long_texts_are_truncated(oracle):
    long = "word " * 20_000
    ids = oracle.runner.tokenize([long, ""])
    assert len(ids[0]) == oracle.runner.max_length <= oracle.runner.model.config.max_position_embeddings
    assert len(ids[1]) == 2  # [CLS] [SEP]
    scores = oracle.evaluate([long, "", "hi"])
    assert scores.valid.all() and torch.isfinite(scores.probs).all()
    assert oracle.evaluate([]).probs.numel() == 0


def test_wrong_label_lists_the_available_labels(tiny_detoxify):
    ckpt, config_dir, _ = tiny_detoxify
    with pytest.raises(
        ValueError, match=r"unknown label 'toxic'.*available labels: toxicity, severe_toxicity"
    ):
        NonToxic("detoxify", checkpoint=ckpt, config_dir=config_dir, label="toxic")
    insult = NonToxic("detoxify", checkpoint=ckpt, config_dir=config_dir, label="insult", device="cpu")
    ref = load_detoxify(checkpoint=ckpt, config_dir=config_dir)
    assert insult.name.startswith("non_insult")
    assert insult.label_index == ref[2].index("insult")


def test_device_placement(oracle):
    assert oracle.device.type == "cpu"
    assert oracle.to("cpu") is oracle
    if torch.cuda.is_available():
        oracle.to("cuda")
        try:
            assert oracle.device.type == "cuda"
            assert oracle(["hello"]).device.type == "cpu"
        finally:
            oracle.to("cpu")


def test_checkpoint_is_read_weights_only(tiny_detoxify, tmp_path):
    loaded = torch.load(tiny_detoxify[0], weights_only=True)
    loaded["extra"] = torch.nn.Linear(2, 2)  # a pickled module: refused by weights_only loading
    torch.save(loaded, tmp_path / "unsafe.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        NonToxic("detoxify", checkpoint=tmp_path / "unsafe.ckpt", config_dir=tiny_detoxify[1])


def test_bad_checkpoints_and_paths_give_clear_errors(tiny_detoxify, tmp_path):
    ckpt, config_dir, _ = tiny_detoxify
    torch.save({"state_dict": {}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="needs keys 'config' and 'state_dict'"):
        NonToxic("detoxify", checkpoint=tmp_path / "bad.ckpt", config_dir=config_dir)
    torch.save({"config": {"arch": {}}, "state_dict": {}}, tmp_path / "bad2.ckpt")
    with pytest.raises(ValueError, match="lacks"):
        NonToxic("detoxify", checkpoint=tmp_path / "bad2.ckpt", config_dir=config_dir)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        NonToxic("detoxify", checkpoint=tmp_path / "missing.ckpt", config_dir=config_dir)
    with pytest.raises(FileNotFoundError, match="config_dir"):
        NonToxic("detoxify", checkpoint=ckpt, config_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="only apply to backend='detoxify'"):
        NonToxic("profanity", checkpoint=ckpt)


def test_online_path_fetches_the_published_checkpoint_weights_only(tiny_detoxify, monkeypatch):
    from detoxify.detoxify import MODEL_URLS

    calls = []
    local = torch.load(tiny_detoxify[2], weights_only=True)

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return local

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    oracle = NonToxic("detoxify", model_type="unbiased", device="cpu")
    assert calls == [(MODEL_URLS["unbiased"], {"map_location": "cpu", "weights_only": True})]
    assert oracle.name == "non_toxic[detoxify:unbiased]"
    with pytest.raises(ValueError, match="unknown detoxify model_type 'huge'.*original, unbiased"):
        NonToxic("detoxify", model_type="huge")


def test_checkpoint_with_missing_weights_is_refused(tiny_detoxify, tmp_path):
    loaded = torch.load(tiny_detoxify[0], weights_only=True)
    del loaded["state_dict"]["classifier.weight"]
    torch.save(loaded, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match=r"lacks 1 weights, e.g. \['classifier.weight'\]"):
        NonToxic("detoxify", checkpoint=tmp_path / "partial.ckpt", config_dir=tiny_detoxify[1])
